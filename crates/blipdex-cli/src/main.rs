//! `blipdex`: bulk-index photo collections with BLIP-2 and search them.

mod args;
mod bench;
mod bench_search;
mod caption;
mod embed;
mod index;
mod ingest;
mod search;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blipdex",
    version,
    about = "BLIP-2 photo indexing and text-to-image search"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Export BLIP-2 features of images and texts to a safetensors file.
    Embed(embed::EmbedArgs),
    /// Caption images (or answer a prompt about them) with a BLIP-2 OPT checkpoint.
    Caption(caption::CaptionArgs),
    /// Index folders of photos (incremental, crash-safe).
    Ingest(ingest::IngestArgs),
    /// Text-to-image search in an index.
    Search(search::SearchArgs),
    /// Throughput benchmarks: embed, caption, search (JSON with --json).
    Bench(bench::BenchArgs),
    /// gRPC retrieval service over an index (search, rerank, captions, health, metrics).
    Serve(serve::ServeArgs),
    /// Index maintenance: upgrade an index written by an earlier blipdex, compact, inspect.
    Index(index::IndexArgs),
}

/// A forward pass allocates and frees tensors of tens of MB by the hundred. glibc hands such
/// blocks back to the kernel on free and page-faults fresh zeroed pages on the next malloc
/// (~7% of an embed batch); keep them in the heap instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called once, before any other thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(&args),
        Command::Caption(args) => caption::run(&args),
        Command::Ingest(args) => ingest::run(&args),
        Command::Search(args) => search::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Index(args) => index::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
