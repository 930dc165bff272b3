#include "router_service/grpc_expert_client.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "common/client_stream_session.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "proto/expert.grpc.pb.h"
#include "router_service/dispatch_wire.h"

namespace moe::router {
namespace {

constexpr char kDispatchMethod[] = "/moe.v1.ExpertServer/Dispatch";

}  // namespace

class GrpcExpertClient::Connection {
 public:
  Connection(const ServerSpec& spec, const Options& options)
      : label_(absl::StrCat("server ", spec.name, " (", spec.address, ")")) {
    channel_ = KeepaliveChannel(spec.address, options.credentials, options.max_message_bytes,
                                options.min_backoff, options.max_backoff);
    stub_ = v1::ExpertServer::NewStub(channel_);
    v1::ExpertServer::Stub* stub = stub_.get();
    // Dispatch through a generic stub: requests go out as DispatchWire and
    // answers come in as ExpertAnswer, their rows copied into no message.
    dispatch_stub_ = std::make_unique<DispatchStub>(channel_);
    DispatchStub* dispatch_stub = dispatch_stub_.get();
    for (int i = 0; i < std::max(1, options.dispatch_streams); ++i) {
      dispatch_.push_back(std::make_unique<DispatchSession>(
          absl::StrCat("server ", spec.name, " (", spec.address, ") Dispatch"),
          [dispatch_stub](grpc::ClientContext* context,
                          grpc::ClientBidiReactor<DispatchWire, ExpertAnswer>* reactor) {
            dispatch_stub->PrepareBidiStreamingCall(context, kDispatchMethod, grpc::StubOptions(),
                                                    reactor);
          },
          options.min_backoff, options.max_backoff));
    }
    backward_ = std::make_unique<BackwardSession>(
        absl::StrCat("server ", spec.name, " (", spec.address, ") BackwardDispatch"),
        [stub](grpc::ClientContext* context,
               grpc::ClientBidiReactor<v1::BackwardDispatchRequest,
                                       v1::BackwardDispatchResponse>* reactor) {
          stub->async()->BackwardDispatch(context, reactor);
        },
        options.min_backoff, options.max_backoff);
    for (auto& session : dispatch_) session->Connect();
  }

  using DispatchStub = grpc::TemplatedGenericStub<DispatchWire, ExpertAnswer>;
  using DispatchSession = ClientStreamSession<DispatchWire, ExpertAnswer>;
  using BackwardSession =
      ClientStreamSession<v1::BackwardDispatchRequest, v1::BackwardDispatchResponse>;

  // The Dispatch streams in turn.
  DispatchSession& NextDispatch() { return *dispatch_[next_.fetch_add(1) % dispatch_.size()]; }
  const std::vector<std::unique_ptr<DispatchSession>>& dispatch() const { return dispatch_; }
  v1::ExpertServer::Stub& stub() { return *stub_; }
  const std::string& label() const { return label_; }
  BackwardSession& backward() { return *backward_; }

 private:
  const std::string label_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertServer::Stub> stub_;
  std::unique_ptr<DispatchStub> dispatch_stub_;
  // After its stub: closed (and waited for) before the stub goes.
  std::vector<std::unique_ptr<DispatchSession>> dispatch_;
  std::atomic<uint64_t> next_{0};
  std::unique_ptr<BackwardSession> backward_;
};

GrpcExpertClient::GrpcExpertClient(Options options) : options_(std::move(options)) {}

std::unique_ptr<GrpcExpertClient> GrpcExpertClient::Create(Options options) {
  auto client = std::unique_ptr<GrpcExpertClient>(new GrpcExpertClient(std::move(options)));
  for (const ServerSpec& spec : client->options_.servers) {
    client->connections_.push_back(std::make_unique<Connection>(spec, client->options_));
  }
  return client;
}

GrpcExpertClient::~GrpcExpertClient() = default;

void GrpcExpertClient::Forward(int server, const v1::DispatchRequest& request,
                               absl::string_view rows, ForwardDone done) {
  // The wire message lives until the answer (it is written before).
  auto wire = std::make_unique<DispatchWire>();
  wire->request = &request;
  wire->rows = rows;
  const DispatchWire& message = *wire;
  connections_.at(server)->NextDispatch().Send(
      message, [wire = std::move(wire), done = std::move(done)](
                   absl::StatusOr<std::unique_ptr<ExpertAnswer>> reply) mutable {
        std::move(done)(std::move(reply));
      });
}

void GrpcExpertClient::Backward(int server, const v1::BackwardDispatchRequest& request,
                                BackwardDone done) {
  connections_.at(server)->backward().Send(request, std::move(done));
}

void GrpcExpertClient::CancelForward(int server, uint64_t sequence_id) {
  auto cancel = std::make_unique<DispatchWire>();
  cancel->owned = std::make_unique<v1::DispatchRequest>();
  cancel->owned->set_sequence_id(sequence_id);
  cancel->owned->set_cancel(true);
  cancel->request = cancel->owned.get();
  // On every stream of the server: cancels are rare, and a stream that does
  // not carry the call ignores it.
  const auto& sessions = connections_.at(server)->dispatch();
  for (size_t i = 1; i < sessions.size(); ++i) {
    auto copy = std::make_unique<DispatchWire>();
    copy->owned = std::make_unique<v1::DispatchRequest>(*cancel->owned);
    copy->request = copy->owned.get();
    sessions[i]->SendOneWay(std::move(copy));
  }
  sessions[0]->SendOneWay(std::move(cancel));
}

namespace {

template <typename Request, typename Response>
using AsyncMethod = void (v1::ExpertServer::Stub::async::*)(grpc::ClientContext*, const Request*,
                                                            Response*,
                                                            std::function<void(grpc::Status)>);

// One unary callback call: owns its context and messages until done. The
// error names the server and the method.
template <typename Request, typename Response>
void CallUnary(v1::ExpertServer::Stub& stub, AsyncMethod<Request, Response> method,
               const std::string& label, const char* method_name, const Request& request,
               absl::Time deadline, ExpertClient::UnaryDone<Response> done,
               bool wait_for_ready = false) {
  struct Call {
    grpc::ClientContext context;
    Request request;
    Response response;
    ExpertClient::UnaryDone<Response> done;
  };
  auto* call = new Call{{}, request, {}, std::move(done)};
  if (deadline != absl::InfiniteFuture()) call->context.set_deadline(absl::ToChronoTime(deadline));
  call->context.set_wait_for_ready(wait_for_ready);
  (stub.async()->*method)(
      &call->context, &call->request, &call->response,
      [call, label, method_name](grpc::Status status) {
        if (status.ok()) {
          std::move(call->done)(std::move(call->response));
        } else {
          const absl::Status s = FromGrpcStatus(status);
          std::move(call->done)(
              absl::Status(s.code(), absl::StrCat(label, " ", method_name, ": ", s.message())));
        }
        delete call;
      });
}

}  // namespace

void GrpcExpertClient::PrepareStep(int server, const v1::PrepareStepRequest& request,
                                   absl::Time deadline, UnaryDone<v1::PrepareStepResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::PrepareStep, c.label(), "PrepareStep",
            request, deadline, std::move(done));
}

void GrpcExpertClient::CommitStep(int server, const v1::CommitStepRequest& request,
                                  absl::Time deadline, UnaryDone<v1::CommitStepResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::CommitStep, c.label(), "CommitStep",
            request, deadline, std::move(done));
}

void GrpcExpertClient::SaveExperts(int server, const v1::SaveExpertsRequest& request,
                                   absl::Time deadline, UnaryDone<v1::SaveExpertsResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::SaveExperts, c.label(), "SaveExperts",
            request, deadline, std::move(done));
}

void GrpcExpertClient::PreparePlacement(int server, const v1::PreparePlacementRequest& request,
                                        absl::Time deadline,
                                        UnaryDone<v1::PreparePlacementResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::PreparePlacement, c.label(),
            "PreparePlacement", request, deadline, std::move(done));
}

void GrpcExpertClient::CommitPlacement(int server, const v1::CommitPlacementRequest& request,
                                       absl::Time deadline,
                                       UnaryDone<v1::CommitPlacementResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::CommitPlacement, c.label(), "CommitPlacement",
            request, deadline, std::move(done));
}

void GrpcExpertClient::AbortPlacement(int server, const v1::AbortPlacementRequest& request,
                                      absl::Time deadline,
                                      UnaryDone<v1::AbortPlacementResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::AbortPlacement, c.label(), "AbortPlacement",
            request, deadline, std::move(done));
}

void GrpcExpertClient::AcquireLease(int server, const v1::AcquireLeaseRequest& request,
                                    absl::Time deadline, UnaryDone<v1::AcquireLeaseResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::AcquireLease, c.label(), "AcquireLease",
            request, deadline, std::move(done));
}

void GrpcExpertClient::AbortStep(int server, const v1::AbortStepRequest& request,
                                 absl::Time deadline, UnaryDone<v1::AbortStepResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::AbortStep, c.label(), "AbortStep",
            request, deadline, std::move(done));
}

void GrpcExpertClient::Info(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) {
  Connection& c = *connections_.at(server);
  // Until the deadline: a server that just came back may sit behind its
  // channel's reconnect back-off (a failed Info is then a timeout).
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::Info, c.label(), "Info", v1::InfoRequest(),
            deadline, std::move(done), /*wait_for_ready=*/true);
}

void GrpcExpertClient::Probe(int server, absl::Time deadline, UnaryDone<v1::InfoResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::Info, c.label(), "Info", v1::InfoRequest(),
            deadline, std::move(done), /*wait_for_ready=*/false);
}

void GrpcExpertClient::UpdateStep(int server, const v1::UpdateStepRequest& request,
                                  absl::Time deadline, UnaryDone<v1::UpdateStepResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::UpdateStep, c.label(), "UpdateStep", request,
            deadline, std::move(done));
}

void GrpcExpertClient::AddGateGradient(int server, const v1::AddGateGradientRequest& request,
                                       absl::Time deadline,
                                       UnaryDone<v1::AddGateGradientResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::AddGateGradient, c.label(), "AddGateGradient",
            request, deadline, std::move(done));
}

void GrpcExpertClient::GetGate(int server, absl::Time deadline,
                               UnaryDone<v1::GetGateResponse> done) {
  Connection& c = *connections_.at(server);
  CallUnary(c.stub(), &v1::ExpertServer::Stub::async::GetGate, c.label(), "GetGate",
            v1::GetGateRequest(), deadline, std::move(done));
}

bool GrpcExpertClient::IsHealthy(int server) const {
  // Any stream in its back-off: the server went away lately.
  for (const auto& session : connections_.at(server)->dispatch()) {
    if (!session->healthy()) return false;
  }
  return true;
}

int64_t GrpcExpertClient::reconnects() const {
  int64_t total = 0;
  for (const auto& c : connections_) {
    for (const auto& session : c->dispatch()) total += session->opened();
    total += c->backward().opened();
  }
  return total;
}

}  // namespace moe::router
