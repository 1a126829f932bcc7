//! Scale: a 10,000-token trace loads into the simulator view, and a model of 120 layers
//! folds into a readable graph and unfolds. Frame times are measured by the benchmark
//! `cargo run --release -p exitgraph-gui --example frame_bench`, not asserted here (a timed
//! test is flaky on shared machines).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::harness;
use egui_kittest::kittest::Queryable;
use exitgraph_gui::app::Tab;
use exitgraph_gui::trace_stats::synthetic;
use exitgraph_gui::ExplorerApp;

#[test]
fn ten_thousand_token_trace_loads_into_the_simulator_view() {
    let mut app = ExplorerApp::demo();
    let records = synthetic(10_000, 6);
    app.sim
        .set_trace(&records, "synthetic trace of 10,000 tokens".into());
    app.tab = Tab::Simulator;
    let mut h = harness(app);
    h.run_steps(5);
    h.get_by_label_contains("10000 tokens, 500 sequences");
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
    // Unfold everything: 1,444 boxes; only those in view are drawn.
    h.get_by_label("Fold repeated layers").click();
    h.run_steps(3);
    assert!(!h.state().graph.collapse);
    assert!(
        h.query_all_by_label_contains("folded").next().is_none(),
        "no folded columns once unfolded"
    );
}
