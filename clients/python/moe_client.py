"""A Python client of the moe-serve router.

Tensors go in and out as numpy arrays ([tokens, d_model], float32; bf16 on
the wire when asked). Stubs come from the build: `bazel build //proto:py_protos`,
then put bazel-bin (for the `proto` package) and this directory on PYTHONPATH.
Uses Debian's python3-grpcio and python3-protobuf (run with /usr/bin/python3).
"""

import grpc
import numpy as np

from proto import health_pb2, health_pb2_grpc, router_pb2, router_pb2_grpc, tensor_pb2

_MAX_MESSAGE_BYTES = 512 << 20
# grpc.StatusCode by number (the wire's Status.code).
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def encode(array, dtype="fp32"):
    """A [tokens, d_model] float array as a moe.v1.Tensor."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a [tokens, d_model] array, got shape {array.shape}")
    tensor = tensor_pb2.Tensor(shape=list(array.shape))
    if dtype == "fp32":
        tensor.dtype = tensor_pb2.DTYPE_FP32
        tensor.data = array.astype("<f4").tobytes()
    elif dtype == "bf16":
        # Round to nearest even, as the servers do.
        bits = array.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        tensor.dtype = tensor_pb2.DTYPE_BF16
        tensor.data = rounded.tobytes()
    else:
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    return tensor


def decode(tensor):
    """A moe.v1.Tensor as a float32 numpy array."""
    shape = tuple(tensor.shape)
    if tensor.dtype == tensor_pb2.DTYPE_FP32:
        return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)
    if tensor.dtype == tensor_pb2.DTYPE_BF16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    raise ValueError(f"unexpected dtype {tensor.dtype}")


def tls_credentials(ca, cert=None, key=None):
    """Channel credentials for a router serving TLS: `ca` the CA certificate
    file (PEM) the router's certificate is checked against; `cert` and `key`
    this client's certificate and key for a router that requires client
    certificates (its identity decides which methods it may call,
    docs/security.md)."""
    def read(path):
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                        certificate_chain=read(cert))


class ForwardResult:
    """y, and for training the request id to pass to backward(). From
    forward_stream(), a request that failed has y None and `error` set to
    (grpc.StatusCode, message); otherwise `error` is None."""

    def __init__(self, response):
        self.error = None
        if response.HasField("error") and response.error.code != 0:
            self.error = (_STATUS_CODES.get(response.error.code, grpc.StatusCode.UNKNOWN),
                          response.error.message)
            self.y = None
            self.request_id = 0
            return
        self.y = decode(response.y)
        self.request_id = response.request_id
        self.dropped_pairs = response.dropped_pairs
        # The batch's load-balancing loss and router z-loss (unweighted).
        self.aux_loss = response.aux_loss
        self.z_loss = response.z_loss
        routing = response.routing
        self.top_k = routing.top_k
        tokens = self.y.shape[0]
        if routing.top_k:
            self.expert_ids = np.array(routing.expert_ids, dtype=np.int32).reshape(tokens, routing.top_k)
            self.weights = np.array(routing.weights, dtype=np.float32).reshape(tokens, routing.top_k)
            self.dropped = np.array(routing.dropped, dtype=bool).reshape(tokens, routing.top_k)


class MoeClient:
    """Calls a router at `address` (host:port). Raises grpc.RpcError on failure.

    `credentials`: grpc.ChannelCredentials (e.g. grpc.ssl_channel_credentials)
    for a router that serves TLS; None is plaintext, what the router serves
    with --transport_security=plaintext (the default).
    """

    def __init__(self, address, timeout=60.0, credentials=None):
        # HTTP/2 keeps a connection to one router: round robin spreads calls
        # over every router the address resolves to (docs/deploy.md).
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.lb_policy_name", "round_robin")]
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._router = router_pb2_grpc.RouterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    def wait_until_healthy(self, timeout=60.0):
        response = self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                      wait_for_ready=True)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("router is not serving")

    def forward(self, x, training=False, return_routing=False, dtype="fp32", layer=0):
        """y = MoE layer `layer`(x) (0 to the model's num_layers - 1)."""
        request = router_pb2.ForwardRequest(x=encode(x, dtype), training=training,
                                            return_routing=return_routing, layer=layer)
        return ForwardResult(self._router.Forward(request, timeout=self._timeout))

    def forward_stream(self, batches, training=False, return_routing=False, dtype="fp32",
                       layers=0):
        """Sends every batch of `batches` on one ForwardStream, all in flight at
        once (the router answers each as soon as it is done, in any order), and
        returns their ForwardResults in the order of `batches`. A batch the
        router refuses has its `error` set; the others are answered as usual.
        `layers`: the MoE layer of every batch, or a list with one per batch
        (one stream may mix layers)."""
        if isinstance(layers, int):
            layers = [layers] * len(batches)
        if len(layers) != len(batches):
            raise ValueError(f"{len(layers)} layers for {len(batches)} batches")
        requests = [router_pb2.ForwardRequest(client_id=i, x=encode(x, dtype), training=training,
                                              return_routing=return_routing, layer=layer)
                    for i, (x, layer) in enumerate(zip(batches, layers))]
        results = [None] * len(requests)
        for response in self._router.ForwardStream(iter(requests), timeout=self._timeout):
            if response.client_id >= len(results) or results[response.client_id] is not None:
                raise RuntimeError(f"unexpected answer for client_id {response.client_id}")
            results[response.client_id] = ForwardResult(response)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"the stream ended without answers for batches {missing}")
        return results

    def cluster_state(self):
        """The router's view of the cluster (moe.v1.ClusterState): its servers and
        what each hosts, the load window, the placement epoch, the committed
        step, and the model it serves (shapes, top_k, the gate)."""
        return self._router.GetClusterState(router_pb2.GetClusterStateRequest(),
                                            timeout=self._timeout)

    def backward(self, request_id, grad_output):
        request = router_pb2.BackwardRequest(request_id=request_id,
                                             grad_output=encode(grad_output))
        return decode(self._router.Backward(request, timeout=self._timeout).grad_input)

    def step(self, learning_rate=0.0, timeout=None):
        """One training step (0: the config's learning rate). Returns the StepResponse."""
        return self._router.Step(router_pb2.StepRequest(learning_rate=learning_rate),
                                 timeout=timeout or self._timeout)

    def save_checkpoint(self, dtype="fp32", timeout=600.0):
        """Writes a checkpoint of the last committed step under the router's
        --checkpoint_dir; returns the SaveCheckpointResponse (step, directory, files,
        bytes, seconds, lineage). The directory is a Hugging Face sharded checkpoint."""
        request = router_pb2.SaveCheckpointRequest(
            dtype=tensor_pb2.DTYPE_BF16 if dtype == "bf16" else tensor_pb2.DTYPE_FP32)
        return self._router.SaveCheckpoint(request, timeout=timeout)

    def close(self):
        self._channel.close()
