//! Opt-in per-op timings (`blipdex bench embed --profile`). While on, each span synchronizes its
//! device before and after, so the GPU time of the kernels it queued lands in it; the sums say
//! where a forward pass goes without an external profiler. Off (the default), a span is one
//! relaxed atomic load around the closure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Result};

static ON: AtomicBool = AtomicBool::new(false);
/// (name, seconds, calls) in first-seen order.
static SPANS: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

/// Starts or stops recording; starting clears earlier records.
pub fn enable(on: bool) {
    if on {
        take();
    }
    ON.store(on, Ordering::Relaxed);
}

/// The records so far (name, total seconds, calls), cleared.
pub fn take() -> Vec<(&'static str, f64, usize)> {
    std::mem::take(&mut *SPANS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`, timed as `name` when recording is on.
pub fn span<T>(name: &'static str, dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    dev.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let s = t.elapsed().as_secs_f64();
    let mut spans = SPANS.lock().unwrap_or_else(|e| e.into_inner());
    match spans.iter_mut().find(|(n, ..)| *n == name) {
        Some(rec) => {
            rec.1 += s;
            rec.2 += 1;
        }
        None => spans.push((name, s, 1)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_on_and_sums_calls() -> Result<()> {
        let dev = Device::Cpu;
        // Other tests may run model code meanwhile: look at this test's names only.
        span("test.off", &dev, || Ok(()))?;
        enable(true);
        for _ in 0..3 {
            span("test.a", &dev, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(())
            })?;
        }
        span("test.b", &dev, || Ok(()))?;
        enable(false);
        span("test.late", &dev, || Ok(()))?;
        let got: Vec<_> = take()
            .into_iter()
            .filter(|r| r.0.starts_with("test."))
            .collect();
        let names: Vec<_> = got.iter().map(|r| r.0).collect();
        assert_eq!(names, ["test.a", "test.b"]);
        assert_eq!(got[0].2, 3);
        assert!(got[0].1 >= 0.006, "{:?}", got[0]);
        Ok(())
    }
}
