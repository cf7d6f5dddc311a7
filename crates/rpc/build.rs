//! Compiles the .proto files with protox (a protobuf compiler in pure Rust, so no `protoc`
//! binary is needed) and generates the message types (prost) and gRPC services (tonic).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile(["raft.proto", "kv.proto", "node.proto"], ["../../proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
