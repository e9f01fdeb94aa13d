//! With `--features mkl`, candle links MKL statically but Intel's OpenMP runtime (libiomp5.so)
//! dynamically: record where it is, so the binary runs without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=MKLROOT");
    if std::env::var_os("CARGO_FEATURE_MKL").is_some() {
        if let Ok(root) = std::env::var("MKLROOT") {
            println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{root}/lib");
        }
    }
}
