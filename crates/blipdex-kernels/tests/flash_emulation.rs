//! The CUDA attention kernels (`src/flash_attention.cu`: tensor cores in f16/bf16, CUDA cores in
//! f32), compiled for the CPU with their warp instructions emulated (`tests/flash_emulation/main.cpp`),
//! against attention in f64: self- and cross-attention, every padded head size, sequences on and off
//! the tiles. It checks the kernels' own code on a machine without a GPU; on a GPU, `cuda_flash`'s
//! test compares the real kernels with candle's unfused ops.

use std::path::Path;
use std::process::Command;

#[test]
fn flash_attention_kernel_matches_f64_attention() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flash_emulation");
    let exe = tempfile::tempdir()?;
    let bin = exe.path().join("flash_emulation");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread"])
        // Warnings shown, and the ones that mean a wrong kernel made errors; not `-Werror` on all
        // of them, which a newer compiler's new warnings would turn into a failing test.
        .args(["-Wall", "-Wno-unknown-pragmas", "-Werror=return-type"])
        .args([
            "-Werror=uninitialized",
            "-Werror=array-bounds",
            "-Werror=parentheses",
            "-o",
        ])
        .arg(&bin)
        .arg(dir.join("main.cpp"))
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "could not run the C++ compiler `{cxx}` (set CXX to one with C++20): {e}"
            )
        })?;
    anyhow::ensure!(
        built.status.success(),
        "{cxx} failed on the emulated flash attention kernel:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&bin).output()?;
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    anyhow::ensure!(
        run.status.success(),
        "the flash attention kernel is off:\n{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Every case reported (a harness that ran nothing would pass the check above).
    anyhow::ensure!(report.lines().count() == 15, "expected 15 cases:\n{report}");
    Ok(())
}
