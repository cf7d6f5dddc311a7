//! Compiles the .proto files with protox (a protobuf compiler in pure Rust, so no `protoc`
//! binary is needed) and generates Rust types with prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile(["raft.proto"], ["../../proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
