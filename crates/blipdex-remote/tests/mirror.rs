//! Publishing and copying real stores through `file://` prefixes (object_store's local file
//! system, the same code path as S3): generations follow, a rebuilt index is replaced file by
//! file, the replaced generation's files are kept for readers and older ones dropped.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use blipdex_remote::mirror::{pull, push};
use blipdex_remote::{Remote, RemoteOptions};
use blipdex_store::synth::Synth;
use blipdex_store::{Batch, Store, StoreOptions};

fn commit(dir: &Path, synth: &Synth, ids: std::ops::Range<u64>) -> Result<()> {
    let mut store = Store::create_or_open(dir, StoreOptions::new("fp", 4, 8))?;
    let mut batch = Batch::new();
    for i in ids {
        batch.add(synth.record(i));
    }
    store.commit(batch)?;
    Ok(())
}

fn hashes(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = Store::open_readonly(dir)?
        .iter()
        .map(|r| r.content_hash)
        .collect();
    v.sort();
    Ok(v)
}

fn names(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    v.sort();
    Ok(v)
}

/// A writer's and a reader's folder, and a `file://` "bucket" between them.
struct Setup {
    _tmp: tempfile::TempDir,
    writer: PathBuf,
    reader: PathBuf,
    bucket: PathBuf,
    remote: Remote,
}

fn setup() -> Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let bucket = tmp.path().join("bucket/index");
    let remote = Remote::open(
        &format!("file://{}", bucket.display()),
        &RemoteOptions::default(),
    )?;
    Ok(Setup {
        writer: tmp.path().join("writer"),
        reader: tmp.path().join("reader"),
        bucket,
        remote,
        _tmp: tmp,
    })
}

#[test]
fn generations_follow_and_a_rebuilt_index_replaces_the_copy() -> Result<()> {
    let Setup {
        _tmp,
        writer,
        reader,
        bucket,
        remote,
    } = setup()?;
    ensure!(pull(&remote, &reader)?.is_none(), "nothing published yet");

    let synth = Synth::new(4, 8, 3, 7);
    commit(&writer, &synth, 0..5)?;
    let first = push(&writer, &remote, false)?;
    ensure!(first.changed && first.copied > 0, "{first:?}");
    let got = pull(&remote, &reader)?.expect("published");
    ensure!(got.generation == first.generation && got.copied == first.copied);
    ensure!(hashes(&reader)? == hashes(&writer)?);
    // Unchanged: nothing moves either way.
    ensure!(!push(&writer, &remote, false)?.changed);
    ensure!(!pull(&remote, &reader)?.expect("published").changed);

    let manifest = |dir: &Path| -> Result<Vec<String>> {
        let bytes = std::fs::read(dir.join("manifest.json"))?;
        Ok(blipdex_store::manifest_info(&bytes, dir)?.files)
    };
    let mut published = vec![manifest(&bucket)?];
    // Nine more generations (the eighth merges the small IVF segments): each push uploads only
    // the new files, each pull copies them.
    for g in 0..9u64 {
        commit(&writer, &synth, 5 + g * 5..10 + g * 5)?;
        let p = push(&writer, &remote, false)?;
        let r = pull(&remote, &reader)?.expect("published");
        ensure!(r.generation == p.generation, "{r:?} {p:?}");
        ensure!(r.copied < first.copied * 3, "only new files: {r:?}");
        ensure!(hashes(&reader)? == hashes(&writer)?);
        published.push(manifest(&bucket)?);
    }
    // The remote and the copy hold what the current and the previous manifest name, nothing
    // older (the first generation's IVF segments were merged away since).
    let [.., previous, current] = &published[..] else {
        unreachable!("ten generations")
    };
    for dir in [&bucket, &reader] {
        let stale: Vec<String> = names(dir)?
            .into_iter()
            .filter(|n| blipdex_store::is_store_file(n))
            .filter(|n| !current.contains(n) && !previous.contains(n))
            .collect();
        ensure!(stale.is_empty(), "{dir:?} keeps {stale:?}");
    }
    let dropped: Vec<&String> = published[0]
        .iter()
        .filter(|n| !current.contains(n) && !previous.contains(n))
        .collect();
    ensure!(!dropped.is_empty(), "the test should see files retire");
    ensure!(
        Store::open_readonly(&bucket).is_ok(),
        "the remote itself is a valid store"
    );

    // Rebuilt in place (a new index id, lower generation): the copy is replaced, not mixed.
    std::fs::remove_dir_all(&writer)?;
    let other = Synth::new(4, 8, 3, 99);
    commit(&writer, &other, 100..103)?;
    let refused = push(&writer, &remote, false).unwrap_err();
    ensure!(refused.to_string().contains("another index"), "{refused}");
    push(&writer, &remote, true)?;
    let r = pull(&remote, &reader)?.expect("published");
    ensure!(r.changed && r.copied > 0);
    ensure!(
        hashes(&reader)? == hashes(&writer)?,
        "the copy is the rebuilt index"
    );
    ensure!(Store::open_readonly(&reader)?.len() == 3);
    Ok(())
}

#[test]
fn a_pull_never_publishes_a_partial_copy() -> Result<()> {
    let Setup {
        _tmp,
        writer,
        reader,
        bucket,
        remote,
    } = setup()?;
    let synth = Synth::new(4, 8, 3, 7);
    commit(&writer, &synth, 0..5)?;
    push(&writer, &remote, false)?;
    pull(&remote, &reader)?;
    commit(&writer, &synth, 5..9)?;
    push(&writer, &remote, false)?;
    // A file of the new generation is lost remotely: the pull fails, naming it, and the copy
    // keeps the generation it had (its manifest is not replaced).
    let shard = names(&bucket)?
        .into_iter()
        .filter(|n| n.starts_with("shard-") && n.ends_with(".parquet"))
        .max()
        .expect("a shard");
    std::fs::remove_file(bucket.join(&shard))?;
    let err = pull(&remote, &reader).unwrap_err();
    ensure!(err.to_string().contains(&shard), "{err}");
    ensure!(
        Store::open_readonly(&reader)?.len() == 5,
        "the old generation stays"
    );
    Ok(())
}

/// A writer's copy of an index deleted from the bucket is dropped, not pushed back; and a file
/// left in the bucket by a push that failed before its manifest is never trusted by name.
#[test]
fn writers_neither_resurrect_nor_trust_leftovers() -> Result<()> {
    let Setup {
        _tmp,
        writer,
        bucket,
        remote,
        ..
    } = setup()?;
    let synth = Synth::new(4, 8, 3, 7);
    commit(&writer, &synth, 0..5)?;
    push(&writer, &remote, false)?;
    // The next generation's shard name, already in the bucket with other bytes (an earlier
    // attempt's upload whose manifest never went up).
    let before: Vec<String> = names(&writer)?;
    commit(&writer, &synth, 5..9)?;
    let new_files: Vec<String> = names(&writer)?
        .into_iter()
        .filter(|n| blipdex_store::is_store_file(n) && !before.contains(n))
        .collect();
    ensure!(!new_files.is_empty());
    for f in &new_files {
        let len = std::fs::metadata(writer.join(f))?.len() as usize;
        // Same size, other bytes: a size check would take it.
        remote.put(f, vec![0xAB; len])?;
    }
    push(&writer, &remote, false)?;
    for f in &new_files {
        ensure!(
            std::fs::read(bucket.join(f))? == std::fs::read(writer.join(f))?,
            "{f}: the leftover was kept"
        );
    }
    ensure!(hashes(&bucket)? == hashes(&writer)?);

    // The index is deleted from the bucket: a writer's copy starts empty.
    std::fs::remove_dir_all(&bucket)?;
    ensure!(blipdex_remote::mirror::pull_for_writing(&remote, &writer)?.is_none());
    ensure!(
        !writer.join("manifest.json").exists(),
        "the stale copy was kept"
    );
    Ok(())
}
