"""One macro per .proto: message library and (optionally) gRPC stub library.

There is no @com_google_protobuf here (Debian ships protoc and libprotobuf, not
the Bazel rules), so code generation is a genrule around the system `protoc`
and `grpc_cpp_plugin`. For `proto/foo.proto` the macro defines:

  :foo_proto    filegroup with the .proto (for protos that import it)
  :foo_cc_proto cc_library with the messages (no gRPC dependency)
  :foo_cc_grpc  cc_library with the service stubs (when services = True)
"""

def cc_grpc_proto(name, deps = [], services = False, visibility = None):
    """Generates C++ for `<name>.proto`.

    Args:
      name: base name of the .proto file in this package.
      deps: base names of .protos in this package that this one imports.
      services: whether the file declares services (adds :<name>_cc_grpc).
      visibility: visibility of the generated libraries.
    """
    src = name + ".proto"
    pkg = native.package_name()
    dep_protos = [":%s_proto" % d for d in deps]

    native.filegroup(
        name = name + "_proto",
        srcs = [src],
        visibility = visibility,
    )

    outs = [name + ".pb.h", name + ".pb.cc"]
    grpc_outs = [name + ".grpc.pb.h", name + ".grpc.pb.cc"] if services else []
    grpc_flags = ""
    tools = []
    if services:
        grpc_flags = (" --grpc_out=$(GENDIR) " +
                      "--plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin)")

    native.genrule(
        name = name + "_cc_gen",
        srcs = [src] + dep_protos,
        outs = outs + grpc_outs,
        cmd = "protoc -I. --cpp_out=$(GENDIR)%s %s/%s" % (grpc_flags, pkg, src),
        tools = tools,
        message = "protoc %s/%s" % (pkg, src),
    )

    native.cc_library(
        name = name + "_cc_proto",
        srcs = [name + ".pb.cc"],
        hdrs = [name + ".pb.h"],
        deps = [":%s_cc_proto" % d for d in deps] + ["//third_party:protobuf"],
        visibility = visibility,
    )

    if services:
        native.cc_library(
            name = name + "_cc_grpc",
            srcs = [name + ".grpc.pb.cc"],
            hdrs = [name + ".grpc.pb.h"],
            deps = [":%s_cc_proto" % name, "//third_party:grpc"],
            visibility = visibility,
        )
