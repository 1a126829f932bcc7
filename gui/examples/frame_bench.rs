//! Frame-time benchmark of the explorer at scale: a 10,000-token trace in the simulator view
//! and a 120-layer model in the graph view, folded and unfolded. Prints the mean and max of
//! the CPU work of a frame (layout and tessellation) over repeated frames.
//!
//! `cargo run --release -p exitgraph-gui --example frame_bench`

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use exitgraph_gui::app::Tab;
use exitgraph_gui::trace_stats::synthetic;
use exitgraph_gui::ExplorerApp;
use std::time::Instant;

fn harness(app: ExplorerApp) -> Harness<'static, ExplorerApp> {
    Harness::builder()
        .with_size([1400.0, 860.0])
        .with_pixels_per_point(1.0)
        .wgpu()
        .build_ui_state(|ui, app: &mut ExplorerApp| app.show(ui), app)
}

/// Mean and max milliseconds of `frames` UI frames, and their median.
fn measure(h: &mut Harness<'static, ExplorerApp>, frames: usize) -> (f64, f64, f64) {
    let mut times = Vec::with_capacity(frames);
    for _ in 0..frames {
        let start = Instant::now();
        h.step();
        let out = h.output().clone();
        let _ = h.ctx.tessellate(out.shapes, out.pixels_per_point);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let max = times.iter().copied().fold(0.0, f64::max);
    times.sort_by(f64::total_cmp);
    (mean, max, times[times.len() / 2])
}

fn report(what: &str, (mean, max, median): (f64, f64, f64)) {
    println!("| {what} | {mean:.2} | {median:.2} | {max:.2} |");
}

fn main() -> anyhow::Result<()> {
    println!("| view | mean ms | median ms | max ms |");
    println!("|---|---:|---:|---:|");
    let mut app = ExplorerApp::demo();
    let records = synthetic(10_000, 6);
    let start = Instant::now();
    app.sim
        .set_trace(&records, "synthetic trace of 10,000 tokens".into());
    let aggregate_ms = start.elapsed().as_secs_f64() * 1e3;
    app.tab = Tab::Simulator;
    let mut h = harness(app);
    h.run_steps(5);
    report("simulator, 10,000-token trace", measure(&mut h, 60));

    let dir = tempfile::tempdir()?;
    let spec = exitgraph::synth::LlamaSpec {
        layers: 120,
        ..exitgraph::synth::LlamaSpec::tiny()
    };
    exitgraph::synth::write_random_llama(&dir.path().join("model"), &spec, 1)?;
    let pipeline = dir.path().join("deep.ron");
    std::fs::write(
        &pipeline,
        "Pipeline(model: \"model\", passes: [TruncateLayers(keep: 100)])",
    )?;
    let mut h = harness(ExplorerApp::open(&pipeline));
    h.run_steps(3);
    report("graph, 120 layers folded", measure(&mut h, 20));
    h.get_by_label("Fold repeated layers").click();
    h.run_steps(3);
    report("graph, 120 layers unfolded", measure(&mut h, 20));
    println!("\ntrace aggregation, once when it loads: {aggregate_ms:.1} ms");
    Ok(())
}
