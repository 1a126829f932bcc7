//! Scale: a 10,000-token trace in the simulator view stays under 16 ms a frame, and a model
//! of 120 layers folds into a readable graph.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::harness;
use egui_kittest::kittest::Queryable;
use exitgraph_gui::app::Tab;
use exitgraph_gui::trace_stats::synthetic;
use exitgraph_gui::ExplorerApp;
use std::time::Instant;

/// Mean and max milliseconds of `frames` UI frames (layout and tessellation: the CPU work
/// of a frame; the GPU draw of a few thousand triangles is not measured here).
fn measure(h: &mut egui_kittest::Harness<'static, ExplorerApp>, frames: usize) -> (f64, f64) {
    let mut times = Vec::with_capacity(frames);
    for _ in 0..frames {
        let start = Instant::now();
        h.step();
        let out = h.output().clone();
        let _ = h.ctx.tessellate(out.shapes, out.pixels_per_point);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let max = times.iter().copied().fold(0.0, f64::max);
    (mean, max)
}

#[test]
fn ten_thousand_token_trace_renders_under_16_ms() {
    let mut app = ExplorerApp::demo();
    let records = synthetic(10_000, 6);
    let start = Instant::now();
    app.sim
        .set_trace(&records, "synthetic trace of 10,000 tokens".into());
    let aggregate_ms = start.elapsed().as_secs_f64() * 1e3;
    app.tab = Tab::Simulator;
    let mut h = harness(app);
    h.run_steps(5);
    h.get_by_label_contains("10000 tokens, 500 sequences");
    let (mean, max) = measure(&mut h, 60);
    println!(
        "simulator view, 10,000-token trace: aggregation {aggregate_ms:.1} ms once; frame mean {mean:.2} ms, max {max:.2} ms over 60 frames"
    );
    assert!(mean < 16.0, "mean frame {mean:.2} ms");
}

#[test]
fn a_model_of_120_layers_folds_and_unfolds() {
    let dir = tempfile::tempdir().unwrap();
    let spec = exitgraph::synth::LlamaSpec {
        layers: 120,
        ..exitgraph::synth::LlamaSpec::tiny()
    };
    exitgraph::synth::write_random_llama(&dir.path().join("model"), &spec, 1).unwrap();
    let pipeline = dir.path().join("deep.ron");
    std::fs::write(
        &pipeline,
        "Pipeline(model: \"model\", passes: [TruncateLayers(keep: 100)])",
    )
    .unwrap();
    let mut h = harness(ExplorerApp::open(&pipeline));
    h.run_steps(3);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    assert!(h.state().graph.collapse, "deep models fold by default");
    // Kept layers fold on both sides; the removed ones fold apart, marked removed.
    assert_eq!(
        h.get_all_by_label_contains("layers 0–99\n×100 folded")
            .count(),
        2
    );
    h.get_by_label_contains("layers 100–119\n×20 folded");
    h.get_by_label("removed 120");
    let (mean, max) = measure(&mut h, 20);
    println!("graph view, 120 layers folded: frame mean {mean:.2} ms, max {max:.2} ms");
    // Unfold everything: 1,444 boxes; only those in view are drawn.
    h.get_by_label("Fold repeated layers").click();
    h.run_steps(3);
    let (mean, max) = measure(&mut h, 20);
    println!("graph view, 120 layers unfolded: frame mean {mean:.2} ms, max {max:.2} ms");
    assert!(mean < 50.0, "{mean}");
}
