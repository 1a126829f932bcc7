//! Wall time per op of the lowered program, for `exitgraph bench --profile`.
//!
//! Off unless [`enable`]d: then each instrumented op (projections by kind, attention's
//! parts, norms, activations, residual adds, the LM head) adds its wall time and call count
//! to a per-thread table keyed by the op's name and shape. CPU ops are synchronous, so the
//! time around a call is the op's time; on a GPU it would time the launch only.
//! When disabled the cost is one relaxed atomic load per op.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static TABLE: RefCell<BTreeMap<String, OpTime>> = const { RefCell::new(BTreeMap::new()) };
}

/// Accumulated time of one op name.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    pub total: Duration,
    pub calls: u64,
}

/// Turns recording on or off (for every thread).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its wall time under the name `label()` makes when recording is on.
pub fn time<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    record(label(), elapsed);
    out
}

/// Adds one call of `elapsed` under `name`.
pub fn record(name: String, elapsed: Duration) {
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry(name).or_default();
        e.total += elapsed;
        e.calls += 1;
    });
}

/// This thread's table, emptied.
pub fn take() -> BTreeMap<String, OpTime> {
    TABLE.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

/// A tensor's shape as `[a, b, c]` for op names.
pub fn shape(t: &candle_core::Tensor) -> String {
    format!("{:?}", t.dims())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_enabled_and_sums_calls() {
        take();
        enable(false);
        let v = time(|| "x".into(), || 1 + 1);
        assert_eq!(v, 2);
        assert!(take().is_empty(), "nothing is recorded when off");
        enable(true);
        time(
            || "a".into(),
            || std::thread::sleep(Duration::from_millis(2)),
        );
        time(|| "a".into(), || ());
        record("b".into(), Duration::from_millis(5));
        enable(false);
        let t = take();
        assert_eq!(t["a"].calls, 2);
        assert!(t["a"].total >= Duration::from_millis(2));
        assert_eq!(
            t["b"],
            OpTime {
                total: Duration::from_millis(5),
                calls: 1
            }
        );
        assert!(take().is_empty(), "take empties the table");
    }
}
