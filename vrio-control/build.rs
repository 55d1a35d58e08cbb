//! Compiles proto/vrio.proto with protox (pure Rust), so no protoc is needed.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/vrio.proto");
    let fds = protox::compile(["proto/vrio.proto"], ["proto"])?;
    // The reflection service serves this encoded set to grpcurl and friends.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("vrio_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
