//! The explorer's views on the demo model, driven through egui_kittest: clicks, labels and
//! snapshot images of each view.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{harness, snapshot_options, step_until};
use egui_kittest::kittest::Queryable;
use exitgraph_gui::app::Tab;
use exitgraph_gui::views::graph::{Selection, Side};
use exitgraph_gui::ExplorerApp;
use std::time::Duration;

#[test]
fn graph_view_shows_both_graphs_and_node_details() {
    let mut h = harness(ExplorerApp::demo());
    h.run_steps(3);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    h.get_by_label_contains("Imported (52 nodes)");
    h.get_by_label_contains("After 0 passes (52 nodes)");
    assert_eq!(h.get_all_by_label("layer 7").count(), 2);
    // Both sides draw layer 0's attention; click the compiled one.
    let attn = h.get_all_by_label("attn\nAttention").count();
    assert_eq!(attn, 16);
    h.get_all_by_label("attn\nAttention")
        .last()
        .unwrap()
        .click();
    h.run_steps(2);
    assert!(matches!(
        h.state().graph.selected,
        Some(Selection::Node(..))
    ));
    h.get_by_label("q.weight: [128, 128]");
    // q and o are 128 × 128 tensors of the checkpoint file.
    assert_eq!(
        h.get_all_by_label_contains("from model.safetensors (F32 [128, 128])")
            .count(),
        2
    );
    h.get_by_label("+ per context token");
    h.snapshot_options("graph", &snapshot_options());

    // Folding: the six identical layers become one block.
    h.get_by_label("Fold repeated layers").click();
    h.run_steps(2);
    assert!(h.query_by_label("layer 5").is_none());
    h.get_all_by_label_contains("×8 folded")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    // Inside a scroll area a press needs the pointer there a frame before, as a hand does.
    h.get_by_label("Unfold layers 0–7").hover();
    h.run_steps(1);
    h.get_by_label("Unfold layers 0–7").click();
    h.run_steps(2);
    assert_eq!(h.get_all_by_label("layer 7").count(), 2);
}

#[test]
fn pipeline_editor_reports_errors_while_typing_and_apply_recompiles() {
    let mut h = harness(ExplorerApp::demo());
    h.run_steps(2);
    h.get_by_label("Pipeline").click();
    h.run_steps(2);
    h.get_by_label("pipeline parses");
    // Break the pipeline by typing into the editor.
    let editor = h.get_by_role(eframe::egui::Role::MultilineTextInput);
    editor.focus();
    editor.type_text("oops");
    h.run_steps(2);
    let err = h.state().editor.error.clone().expect("an error");
    assert!(err.line > 0 && err.column > 0, "{err:?}");
    h.get_by_label_contains(&format!("error at {}:{}", err.line, err.column));
    h.snapshot_options("pipeline_error", &snapshot_options());

    // A pipeline that parses but does not fit the model: the error shows, nothing panics,
    // the last good compile stays.
    h.state_mut().editor.text = "Pipeline(passes: [TruncateLayers(keep: 99)])".into();
    h.run_steps(2);
    h.get_by_label("Apply").click();
    h.run_steps(2);
    let e = h.state().compile_error.clone().expect("a compile error");
    assert!(e.contains("TruncateLayers"), "{e}");
    assert_eq!(h.state().loaded.as_ref().unwrap().depth(), 8);

    // Fix it with a pass and apply.
    h.state_mut().editor.text =
        "Pipeline(\n    passes: [TruncateLayers(keep: 3)],\n    runtime: (max_new_tokens: 4),\n)\n"
            .into();
    h.run_steps(2);
    h.get_by_label("pipeline parses");
    h.get_by_label("Apply").click();
    h.run_steps(2);
    let l = h.state().loaded.as_ref().unwrap();
    assert_eq!(l.depth(), 3);
    assert_eq!(l.passes.len(), 1);
    h.snapshot_options("pipeline", &snapshot_options());
    h.get_by_label("Graph").click();
    h.run_steps(3);
    h.get_by_label_contains("After 1 pass (22 nodes)");
    let (added, changed, removed) = h.state().loaded.as_ref().unwrap().diff.counts();
    h.get_by_label(&format!("changed {changed}"));
    h.get_by_label(&format!("removed {removed}"));
    assert_eq!((added, removed), (0, 30));
    assert!(changed >= 1);
    h.snapshot_options("graph_truncated", &snapshot_options());
}

#[test]
fn run_view_generates_and_shows_each_tokens_layers() {
    let mut h = harness(ExplorerApp::demo());
    h.run_steps(2);
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.state_mut().run.prompts = "copy: K7F2Q | K\nsome birds are cold".into();
    h.state_mut().run.max_new_tokens = 6;
    h.get_by_label("Run prompts").click();
    h.run_steps(1);
    step_until(&mut h, "the run", Duration::from_secs(120), |a| {
        !a.run.running()
    });
    assert!(h.state().run.error.is_none(), "{:?}", h.state().run.error);
    let r = h.state().run.result.as_ref().unwrap();
    // Up to 6 tokens per prompt; both stop early at the end-of-sequence token.
    assert!((2..=12).contains(&r.heatmap.rows.len()));
    assert_eq!(r.heatmap.depth, 8);
    // No exit heads: every token ran all eight layers and exited at the top.
    assert!(r.heatmap.rows.iter().all(|row| row.exit_layer == 8));
    assert_eq!(r.histogram[8], r.heatmap.rows.len() as u64);
    assert!(r.outputs[0].1.starts_with("7F2Q"), "{:?}", r.outputs[0]);
    h.get_by_label_contains("layer ran");
    h.get_by_label("L5");
    h.snapshot_options("run", &snapshot_options());

    // Select the first token: its compute path is outlined on the graph.
    h.get_all_by_label_contains("#1 pos")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    let path = h.state().graph.path.clone().expect("a compute path");
    assert_eq!(path.nodes.len(), 52);
    h.get_by_label("Open Graph").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Graph);
    h.get_by_label_contains("compute path of token");
    h.snapshot_options("graph_path", &snapshot_options());
}

/// Under a GemFilter pipeline the run view marks, per prompt, the tokens the full model ran
/// on (and their scores on hover).
#[test]
fn run_view_marks_the_prompt_tokens_gemfilter_kept() {
    let path = exitgraph_gui::views::sim::examples_dir().join("demo-gemfilter-keep8.ron");
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(2);
    assert!(h.state().loaded.as_ref().unwrap().after.filter.is_some());
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.state_mut().run.prompts = "recall: H0, D7, Z8, Q4, M1; Z\ncopy: K7F2Q | K".into();
    h.state_mut().run.max_new_tokens = 3;
    h.get_by_label("Run prompts").click();
    h.run_steps(1);
    step_until(&mut h, "the run", Duration::from_secs(120), |a| {
        !a.run.running()
    });
    assert!(h.state().run.error.is_none(), "{:?}", h.state().run.error);
    let r = h.state().run.result.as_ref().unwrap();
    assert_eq!(r.selections.len(), 2);
    for s in &r.selections {
        assert_eq!(s.layer, 1);
        assert_eq!(s.kept(), 8.min(s.tokens.len()));
        assert!(s.tokens.iter().all(|t| t.2.is_finite() && t.3.is_finite()));
        // The kept tokens are those with the highest pooled scores.
        let lowest_kept = s
            .tokens
            .iter()
            .filter(|t| t.1)
            .map(|t| t.3)
            .fold(f32::INFINITY, f32::min);
        assert!(s.tokens.iter().filter(|t| !t.1).all(|t| t.3 <= lowest_kept));
    }
    // The recall prompt is longer than 8 tokens: some are dropped.
    assert!(r.selections[0].tokens.len() > 8);
    h.get_by_label_contains("#1 kept 8 of");
    h.snapshot_options("run_gemfilter", &snapshot_options());
}

/// Under self-speculative decoding the run view colours each token by how it came: a kept
/// draft, or the full model's token after a rejected draft or after the drafts.
#[test]
fn run_view_colours_self_speculative_tokens() {
    use exitgraph::runtime::metrics::Speculated;
    let path = exitgraph_gui::views::sim::examples_dir().join("demo-speculative.ron");
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(2);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.state_mut().run.prompts = "copy: K7F2Q |\nsome birds".into();
    h.state_mut().run.max_new_tokens = 8;
    h.get_by_label("Run prompts").click();
    h.run_steps(1);
    step_until(&mut h, "the run", Duration::from_secs(120), |a| {
        !a.run.running()
    });
    assert!(h.state().run.error.is_none(), "{:?}", h.state().run.error);
    let rows = &h.state().run.result.as_ref().unwrap().heatmap.rows;
    // "some birds" ends at its end-of-sequence token within a cycle: the cycle's later
    // tokens are dropped, and every prompt's positions follow each other once each.
    assert!(rows.len() < 16, "{} rows", rows.len());
    for seq in 0..2 {
        let pos: Vec<usize> = rows
            .iter()
            .filter(|r| r.seq == seq)
            .map(|r| r.pos)
            .collect();
        assert!(pos.windows(2).all(|w| w[1] == w[0] + 1), "{pos:?}");
    }
    // The first token of each prompt comes from the prompt's pass; every later one is marked.
    let marked = rows.iter().filter(|r| r.speculated.is_some()).count();
    assert_eq!(marked, rows.len() - 2);
    assert!(rows
        .iter()
        .any(|r| r.speculated == Some(Speculated::Accepted)));
    h.get_by_label_contains("Self-speculative tokens");
    h.snapshot_options("run_speculative", &snapshot_options());
}

#[test]
fn simulator_view_runs_a_workload_and_rejects_bad_traces() {
    let mut h = harness(ExplorerApp::demo());
    h.run_steps(2);
    h.get_by_label("Simulator").click();
    h.run_steps(2);
    h.get_by_label("Run simulation").click();
    h.run_steps(1);
    step_until(&mut h, "the simulation", Duration::from_secs(120), |a| {
        !a.sim.running()
    });
    assert!(h.state().sim.error.is_none(), "{:?}", h.state().sim.error);
    let s = h.state().sim.summary.as_ref().unwrap();
    // examples/workloads/poisson.ron: 64 requests of 16 tokens.
    assert_eq!(s.records, 64 * 16);
    assert_eq!(s.depth, 8);
    h.get_by_label_contains("64 of 64 requests completed");
    h.get_by_label("Throughput (tokens/s)");
    h.snapshot_options("simulator", &snapshot_options());

    // A file that is not a trace: an error in the view, no panic, the plots stay.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "not json\n").unwrap();
    h.state_mut().sim.trace_path = bad.display().to_string();
    h.get_by_label("Load trace").click();
    h.run_steps(2);
    h.get_by_label_contains("bad.jsonl:1");
    assert!(h.state().sim.summary.is_some());
}

#[test]
fn simulator_view_serves_a_looped_model_with_rows_per_iteration() {
    // The recursive demo (4 layers looped twice) under looped depth-wise batching: each
    // step's rows at each iteration come back in the report and are plotted per iteration.
    let path = exitgraph_gui::views::sim::examples_dir().join("demo-recursive.ron");
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(3);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    h.get_by_label("Simulator").click();
    h.run_steps(2);
    h.get_by_label("looped").click();
    h.run_steps(1);
    h.get_by_label("Run simulation").click();
    h.run_steps(1);
    step_until(&mut h, "the simulation", Duration::from_secs(120), |a| {
        !a.sim.running()
    });
    assert!(h.state().sim.error.is_none(), "{:?}", h.state().sim.error);
    let report = h.state().sim.report.as_ref().unwrap();
    assert_eq!(report.mean_stage_rows.len(), 2, "one series per iteration");
    assert!(report.mean_stage_rows.iter().all(|&r| r > 0.0));
    let series = exitgraph_gui::views::sim::stage_series(report);
    assert_eq!(series.len(), 2);
    assert_eq!(series[0].len() as u64, report.steps);
    h.get_by_label_contains("LoopedDepthWise");
    h.snapshot_options("simulator_looped", &snapshot_options());
}

#[test]
fn run_view_colours_exit_signals_when_the_trace_has_them() {
    use exitgraph::runtime::trace::{LayerSignal, TraceRecord};
    use exitgraph_gui::serving::PromptResult;
    use exitgraph_gui::views::run::RunData;
    // A trace as a program with exit heads after layers 2 and 4 writes it: some tokens
    // leave at 2, some at 4, the rest run all 8 layers.
    let records: Vec<TraceRecord> = (0..9)
        .map(|i| {
            let exit = [2, 4, 8][i % 3];
            TraceRecord {
                speculated: None,
                seq: 0,
                pos: 10 + i,
                token: Some(40 + i as u32),
                step: i as u64,
                t_s: i as f64 * 0.01,
                batch: 1,
                stages: vec!["all".into()],
                layers: (0..exit).collect(),
                exit_layer: exit,
                signals: [2, 4]
                    .into_iter()
                    .filter(|&l| l <= exit)
                    .map(|l| LayerSignal {
                        layer: l,
                        value: if l == exit {
                            0.9
                        } else {
                            0.2 + 0.05 * i as f64
                        },
                        token: Some(40 + i as u32),
                    })
                    .collect(),
            }
        })
        .collect();
    let mut app = ExplorerApp::demo();
    let result = PromptResult {
        records,
        outputs: vec![(40..49).collect()],
        selections: Vec::new(),
    };
    let data = RunData::new(
        &result,
        &["copy: K7F2Q | K".to_string()],
        app.loaded.as_ref().unwrap(),
    );
    assert!(data.heatmap.has_signals());
    assert_eq!(&data.histogram[1..], &[0, 3, 0, 3, 0, 0, 0, 3]);
    app.run.result = Some(data);
    app.tab = Tab::Run;
    let mut h = harness(app);
    h.run_steps(3);
    h.get_by_label_contains("colour: exit signal");
    h.snapshot_options("run_signals", &snapshot_options());

    // A token that left after 2 layers: its path stops at layer 1.
    h.get_all_by_label_contains("pos 10")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    let path = h.state().graph.path.clone().unwrap();
    let g = &h.state().loaded.as_ref().unwrap().after;
    let layers: std::collections::BTreeSet<usize> = path
        .nodes
        .iter()
        .filter_map(|&n| g.graph[n].layer)
        .collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    h.state_mut().tab = Tab::Graph;
    h.run_steps(3);
    h.snapshot_options("graph_exit_path", &snapshot_options());
}

#[test]
fn exits_view_plots_the_demo_sweep_and_reports_bad_files() {
    let mut h = harness(ExplorerApp::demo());
    h.run_steps(2);
    h.get_by_label("Exits").click();
    h.run_steps(3);
    assert_eq!(h.state().tab, Tab::Exits);
    let report = h
        .state()
        .exits
        .report
        .clone()
        .expect("the demo sweep loads");
    assert!(!report.rows.is_empty());
    h.get_by_label_contains("Large markers: measured speedup");
    assert!(h.get_all_by_label("oracle (upper bound)").count() >= 1);
    h.snapshot_options("exits", &snapshot_options());
    h.state_mut().exits.path = "no-such-sweep.json".into();
    h.get_by_label("Load").click();
    h.run_steps(2);
    assert!(h
        .state()
        .exits
        .error
        .as_deref()
        .is_some_and(|e| e.contains("no-such-sweep.json")));
}

#[test]
fn run_view_shows_real_exits_of_the_demo_exits_pipeline() {
    let path = exitgraph_gui::views::sim::examples_dir().join("demo-exits.ron");
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(2);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    h.get_by_label("Run").click();
    h.run_steps(2);
    h.state_mut().run.prompts = "some birds\ncopy: K7F2Q | K".into();
    h.state_mut().run.max_new_tokens = 8;
    h.get_by_label("Run prompts").click();
    h.run_steps(1);
    step_until(&mut h, "the run", Duration::from_secs(120), |a| {
        !a.run.running()
    });
    assert!(h.state().run.error.is_none(), "{:?}", h.state().run.error);
    let r = h.state().run.result.as_ref().unwrap();
    assert!(r.heatmap.has_signals());
    // The sentence's closing " ." is certain early (after layer 2 on the demo model).
    assert!(
        r.heatmap.rows.iter().any(|row| row.exit_layer < 8),
        "some token exits early"
    );
    // Selecting a token that exited early outlines its path to the exit head the pass
    // added (read from the graph's exit record), not the model's own head.
    let (seq, pos, exit) = r
        .heatmap
        .rows
        .iter()
        .find(|row| row.exit_layer < 8)
        .map(|row| (row.seq, row.pos, row.exit_layer))
        .unwrap();
    h.snapshot_options("run_exits", &snapshot_options());
    h.get_all_by_label_contains(&format!("#{} pos {pos} ", seq + 1))
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    let path = h.state().graph.path.clone().unwrap();
    let g = &h.state().loaded.as_ref().unwrap().after;
    let head = g.exit_at(exit).and_then(|e| e.logits).unwrap();
    assert_eq!(g.graph[head].name, format!("exit.{exit}.head"));
    assert!(path.nodes.contains(&head), "the exit head is on the path");
    assert!(
        !path.nodes.contains(&g.head.logits.unwrap()),
        "the model's head is not"
    );
    h.state_mut().tab = Tab::Graph;
    h.run_steps(3);
    h.snapshot_options("graph_exit_head", &snapshot_options());
}

#[test]
fn graph_view_draws_a_looped_block_once_with_its_adapters_until_unfolded() {
    use exitgraph::runtime::trace::TraceRecord;
    use exitgraph_gui::serving::PromptResult;
    use exitgraph_gui::views::run::RunData;
    // The demo's 8 layers tied into a block of 4 looped twice, a rank-16 LoRA per iteration.
    let path = exitgraph_gui::views::sim::examples_dir().join("demo-recursive.ron");
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(3);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    // The imported model keeps its 8 layer columns; the compiled one draws the block once.
    assert_eq!(h.get_all_by_label("layer 7").count(), 1);
    assert_eq!(h.get_all_by_label("looped block").count(), 1);
    h.get_by_label("×2 loops\nlayers 0–3 shared\nLoRA r16\nper iteration\ndepths 0–7")
        .click();
    h.run_steps(2);
    assert_eq!(h.state().graph.selected, Some(Selection::Loop(Side::After)));
    h.get_by_label("iteration i1: depths 4–7");
    h.get_by_label("each layer: RmsNorm · Attention · Add · RmsNorm · Mlp · Add");
    // Out of the way of the box's text.
    h.get_by_label("Details").hover();
    h.run_steps(1);
    h.snapshot_options("graph_looped", &snapshot_options());

    // A node of the second iteration: its shared weights, iteration and adapter ranks.
    h.get_by_label("Unfold loop").hover();
    h.run_steps(1);
    h.get_by_label("Unfold loop").click();
    h.run_steps(2);
    assert_eq!(h.get_all_by_label("layer 7").count(), 2);
    assert!(h.query_by_label("looped block").is_none());
    let g = &h.state().loaded.as_ref().unwrap().after;
    let attn5 = g.find("layers.5.attn").unwrap();
    h.state_mut().graph.selected = Some(Selection::Node(Side::After, attn5));
    h.run_steps(2);
    h.get_by_label("shared layer 1 (depths 1, 5)");
    h.get_by_label("i1 (number 2 of 2)");
    assert_eq!(
        h.get_all_by_label_contains(": rank 16, scale 1,").count(),
        4,
        "q, k, v and o each have an adapter"
    );

    // A token that ran every depth: the folded block is its path, both iterations counted;
    // the heatmap's columns read as (loop, layer).
    let records: Vec<TraceRecord> = [8, 4]
        .into_iter()
        .enumerate()
        .map(|(i, exit)| TraceRecord {
            speculated: None,
            seq: 0,
            pos: 10 + i,
            token: Some(40 + i as u32),
            step: i as u64,
            t_s: 0.0,
            batch: 1,
            stages: vec!["all".into()],
            layers: (0..exit).collect(),
            exit_layer: exit,
            signals: Vec::new(),
        })
        .collect();
    let data = RunData::new(
        &PromptResult {
            records,
            outputs: vec![vec![40, 41]],
            selections: Vec::new(),
        },
        &["copy: K7F2Q | K".to_string()],
        h.state().loaded.as_ref().unwrap(),
    );
    h.state_mut().run.result = Some(data);
    h.state_mut().tab = Tab::Run;
    h.run_steps(2);
    h.get_by_label("Tokens × (loop, layer)");
    h.get_by_label("i1·L2");
    assert!(h.query_by_label("L7").is_none());
    h.get_all_by_label_contains("pos 11")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    h.get_by_label_contains("4 layers run (1 of 2 iterations)");
    h.get_all_by_label_contains("pos 10")
        .next()
        .unwrap()
        .click();
    h.run_steps(2);
    let run = h.state().graph.path.as_ref().unwrap().iterations.unwrap();
    assert_eq!((run.ran, run.of), (2, 2));
    h.state_mut().tab = Tab::Graph;
    h.run_steps(2);
    h.get_by_label("Fold loop (×2)").click();
    h.run_steps(2);
    h.get_by_label_contains("path: 2 of 2 iterations");
    h.get_by_label_contains("· 2 of 2 iterations");
}

/// A Kangaroo adapter (the tiny Llama of the fixtures with the reference adapter after layer
/// 2): the compiled graph draws its attention in the exit head, and its node details name
/// the adapter's own weights.
#[test]
fn graph_view_draws_a_kangaroo_adapter_in_its_exit_head() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kangaroo.ron");
    std::fs::write(
        &path,
        format!(
            "Pipeline(model: {:?}, passes: [InsertExits(after: [2], head: AttentionAdapter, weights: {:?})], runtime: (depth: SelfSpeculative(draft_exit: 2, max_draft: 6, stop_below: Some(0.6))))",
            root.join("tiny-llama").display().to_string(),
            root.join("kangaroo/adapter.safetensors").display().to_string()
        ),
    )
    .unwrap();
    let mut h = harness(ExplorerApp::open(&path));
    h.run_steps(3);
    assert!(h.state().loaded.is_some(), "{:?}", h.state().compile_error);
    let g = &h.state().loaded.as_ref().unwrap().after;
    let adapter = g.find("exit.2.attn").expect("the adapter's attention");
    h.state_mut().graph.selected = Some(Selection::Node(Side::After, adapter));
    h.run_steps(2);
    h.get_all_by_label_contains("exits.2.attn.q.weight")
        .next()
        .expect("the adapter's own q weight is listed");
    // Its file by name (the whole path on hover): q and o are 64 × 64, k and v 32 × 64 (two
    // key-value heads of 16).
    for shape in ["[64, 64]", "[32, 64]"] {
        let label = format!("  from adapter.safetensors (F32 {shape})");
        assert_eq!(h.get_all_by_label(&label).count(), 2, "{label}");
    }
    h.snapshot_options("graph_kangaroo", &snapshot_options());
}
