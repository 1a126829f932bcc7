//! Shared test helpers: a harness around the explorer and waiting for background jobs.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use egui_kittest::{Harness, SnapshotOptions};
use exitgraph_gui::ExplorerApp;
use std::time::{Duration, Instant};

pub const SIZE: [f32; 2] = [1400.0, 860.0];

pub fn harness(app: ExplorerApp) -> Harness<'static, ExplorerApp> {
    Harness::builder()
        .with_size(SIZE)
        .with_pixels_per_point(1.0)
        .wgpu()
        .build_ui_state(|ui, app: &mut ExplorerApp| app.show(ui), app)
}

/// Steps the UI until `done` holds (background jobs finish on their own threads).
pub fn step_until(
    h: &mut Harness<'static, ExplorerApp>,
    what: &str,
    limit: Duration,
    done: impl Fn(&ExplorerApp) -> bool,
) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
        h.step();
    }
    h.run_steps(3);
}

/// Snapshots tolerate the small differences between software and hardware renderers.
pub fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions::new()
        .threshold(2.0)
        .max_failed_pixels(4000)
}
