//! Compiles every `.proto` under `usher/` with the vendored `protoc`, so a fresh
//! machine needs no system package, and exports the file descriptor set for
//! reflection and for the gateway's policy table.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut protos = Vec::new();
    collect_protos(&root.join("usher"), &mut protos)?;
    protos.sort();
    println!("cargo:rerun-if-changed=usher");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `prost::Name` on every message: its full name finds its descriptor
    // (the services' input checks walk requests by reflection).
    config.enable_type_names();
    tonic_prost_build::configure()
        // RPCs a service does not implement yet answer UNIMPLEMENTED instead
        // of failing the build; the service issues fill them in.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("usher_descriptor.bin"))
        .compile_with_config(
            config,
            &protos,
            &[root.clone(), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
