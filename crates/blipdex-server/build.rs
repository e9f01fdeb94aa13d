//! Generates the `blipdex.v1` messages and the tonic server/client from
//! `proto/blipdex/v1/retrieval.proto` with a vendored `protoc` (no system protoc needed), and
//! writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the protoc named by PROTOC: the vendored one, never a system protoc.
    std::env::set_var("PROTOC", protoc);
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("blipdex/v1/retrieval.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("blipdex_v1_descriptor.bin"))
        // prost's codec, but a request that does not decode is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
