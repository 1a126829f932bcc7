//! Graph view: the imported graph and the compiled graph side by side, nodes added or
//! changed by passes highlighted, a token's compute path outlined, details of the clicked
//! node beside them. A tied model's looped block is drawn once, with its loop count and
//! adapters, until it is unfolded. Zoom with ctrl + scroll (or pinch), pan by dragging.

use crate::collapse::{group, CollapseOptions, Grouping, Item};
use crate::diff::NodeStatus;
use crate::layout::{columns_per_row, layout, Layout};
use crate::loaded::Loaded;
use crate::looping::{IterationsRun, Looping};
use crate::node_info::{details, distinct_params, totals};
use crate::viewport::Viewport;
use eframe::egui::{self, epaint::CubicBezierShape, Color32, Rect, RichText, Stroke, Ui};
use exitgraph::inspect::human;
use exitgraph_ir::{Graph, NodeIndex};
use std::collections::BTreeSet;

/// Which of the two graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Before,
    After,
}

/// What is selected in the graph view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Node(Side, NodeIndex),
    Block(Side, usize, usize),
    /// The folded looped block of one side.
    Loop(Side),
}

/// A token's compute path, shown on the compiled graph.
#[derive(Clone, Debug, Default)]
pub struct PathHighlight {
    pub label: String,
    pub nodes: BTreeSet<NodeIndex>,
    /// The loop iterations the token ran, over a tied model.
    pub iterations: Option<IterationsRun>,
}

/// One side, laid out.
struct Drawn {
    grouping: Grouping,
    layout: Layout,
    per_row: usize,
    labels: Vec<String>,
    status: Vec<NodeStatus>,
}

impl Drawn {
    fn new(g: &Graph, status: impl Fn(&str) -> NodeStatus, opts: &CollapseOptions) -> Self {
        let grouping = group(g, &status, opts);
        let per_row = grouping.columns.len();
        let layout = layout(&grouping, per_row);
        let mut labels = Vec::with_capacity(grouping.items.len());
        let mut statuses = Vec::with_capacity(grouping.items.len());
        for item in &grouping.items {
            match item {
                Item::Node(n) => {
                    let node = &g.graph[*n];
                    let short = match node.layer {
                        Some(l) => node
                            .name
                            .strip_prefix(&format!("layers.{l}."))
                            .unwrap_or(&node.name),
                        None => &node.name,
                    };
                    labels.push(format!("{short}\n{}", node.op.kind()));
                    statuses.push(status(&node.name));
                }
                Item::Block {
                    first,
                    last,
                    nodes,
                    kinds,
                } => {
                    labels.push(format!(
                        "layers {first}–{last}\n×{} folded\n{}",
                        last - first + 1,
                        kinds.join(" · ")
                    ));
                    statuses.push(
                        nodes
                            .iter()
                            .map(|&n| status(&g.graph[n].name))
                            .max()
                            .unwrap_or(NodeStatus::Same),
                    );
                }
                Item::Loop { looping, nodes, .. } => {
                    labels.push(loop_label(looping));
                    statuses.push(
                        nodes
                            .iter()
                            .map(|&n| status(&g.graph[n].name))
                            .max()
                            .unwrap_or(NodeStatus::Same),
                    );
                }
            }
        }
        Drawn {
            grouping,
            layout,
            per_row,
            labels,
            status: statuses,
        }
    }
}

/// The text of a folded looped block's box, a line per fact (the box is narrow): loop count,
/// shared layers, adapters, depths run.
fn loop_label(looping: &Looping) -> String {
    let mut lines = vec![format!("×{} loops", looping.loops), looping.shared()];
    if let Some(rank) = looping.adapter_rank() {
        lines.push(format!("LoRA {rank}"));
        lines.push("per iteration".to_string());
    }
    let depths = looping.depths();
    lines.push(format!("depths {}–{}", depths.start, depths.end - 1));
    lines.join("\n")
}

#[derive(Default)]
pub struct GraphView {
    pub collapse: bool,
    /// Fold a tied model's looped block into one box.
    pub loops: bool,
    /// The compiled model's loop, when its layers are tied.
    pub looping: Option<Looping>,
    pub expanded: BTreeSet<usize>,
    pub selected: Option<Selection>,
    pub path: Option<PathHighlight>,
    before: Option<Drawn>,
    after: Option<Drawn>,
    view_before: Option<Viewport>,
    view_after: Option<Viewport>,
    expand_layer: usize,
}

const ADDED: Color32 = Color32::from_rgb(46, 125, 50);
const CHANGED: Color32 = Color32::from_rgb(191, 120, 0);
const REMOVED: Color32 = Color32::from_rgb(160, 40, 40);
const PATH: Color32 = Color32::from_rgb(30, 136, 229);

fn status_fill(s: NodeStatus, dark: bool) -> Option<Color32> {
    let c = match s {
        NodeStatus::Same => return None,
        NodeStatus::Added => ADDED,
        NodeStatus::Changed => CHANGED,
        NodeStatus::Removed => REMOVED,
    };
    Some(if dark {
        c.gamma_multiply(0.8)
    } else {
        c.gamma_multiply(0.45)
    })
}

impl Drawn {
    /// Wraps the columns into rows that fit a view of `size`; true when the layout changed.
    fn fit(&mut self, size: egui::Vec2) -> bool {
        let k = columns_per_row(&self.grouping, (size.x, size.y));
        if k == self.per_row {
            return false;
        }
        self.per_row = k;
        self.layout = layout(&self.grouping, k);
        true
    }
}

impl GraphView {
    /// Drops the layouts; the next frame rebuilds them (a new pipeline was applied).
    pub fn reset(&mut self, loaded: Option<&Loaded>) {
        self.before = None;
        self.after = None;
        self.selected = None;
        self.path = None;
        self.view_before = None;
        self.view_after = None;
        // Fold by default when the model is deep; a looped block is always shown once first.
        self.collapse = loaded.is_some_and(|l| l.before.info.num_layers > 12);
        self.loops = true;
        self.looping = loaded.and_then(|l| Looping::of(&l.after));
        self.expanded.clear();
    }

    fn relayout(&mut self) {
        self.before = None;
        self.after = None;
        self.view_before = None;
        self.view_after = None;
    }

    fn ensure(&mut self, loaded: &Loaded) {
        let opts = CollapseOptions {
            collapse: self.collapse,
            loops: self.loops,
            expanded: self.expanded.clone(),
        };
        if self.before.is_none() {
            self.before = Some(Drawn::new(
                &loaded.before,
                |n| loaded.diff.status_before(n),
                &opts,
            ));
        }
        if self.after.is_none() {
            self.after = Some(Drawn::new(
                &loaded.after,
                |n| loaded.diff.status_after(n),
                &opts,
            ));
        }
    }

    pub fn show(&mut self, ui: &mut Ui, loaded: Option<&Loaded>) {
        let Some(loaded) = loaded else {
            ui.label(
                "No pipeline is compiled: fix the pipeline in the Pipeline tab and press Apply.",
            );
            return;
        };
        self.ensure(loaded);
        let (added, changed, removed) = loaded.diff.counts();
        ui.horizontal_wrapped(|ui| {
            if ui
                .checkbox(&mut self.collapse, "Fold repeated layers")
                .changed()
            {
                self.expanded.clear();
                self.relayout();
            }
            if let Some(looping) = self.looping.clone() {
                let mut folded =
                    self.loops && !looping.depths().any(|d| self.expanded.contains(&d));
                if ui
                    .checkbox(&mut folded, format!("Fold loop (×{})", looping.loops))
                    .changed()
                {
                    self.loops = folded;
                    self.expanded.retain(|d| !looping.depths().contains(d));
                    self.selected = None;
                    self.relayout();
                }
            }
            if ui.button("Fit").clicked() {
                self.view_before = None;
                self.view_after = None;
            }
            ui.separator();
            legend(ui, ADDED, &format!("added {added}"));
            legend(ui, CHANGED, &format!("changed {changed}"));
            legend(ui, REMOVED, &format!("removed {removed}"));
            if let Some(p) = &self.path {
                let iterations = p.iterations.map(|i| format!(" · {i}")).unwrap_or_default();
                legend(
                    ui,
                    PATH,
                    &format!("compute path of {}{iterations}", p.label),
                );
                if ui.button("Clear path").clicked() {
                    self.path = None;
                }
            }
            ui.separator();
            ui.weak("ctrl + scroll zooms, drag pans, click a node for details");
        });
        ui.separator();

        egui::Panel::right("node_details")
            .resizable(true)
            .default_size(300.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.details_panel(ui, loaded));
            });

        let avail = ui.available_rect_before_wrap();
        let half = (avail.width() - 8.0) / 2.0;
        let left = Rect::from_min_size(avail.min, egui::vec2(half, avail.height()));
        let right = Rect::from_min_size(
            egui::pos2(avail.min.x + half + 8.0, avail.min.y),
            egui::vec2(half, avail.height()),
        );
        let mut clicked: Option<Selection> = None;
        let dark = ui.visuals().dark_mode;
        for (side, rect) in [(Side::Before, left), (Side::After, right)] {
            let mut child = ui.new_child(
                egui::UiBuilder::new()
                    .max_rect(rect)
                    .id_salt(("graph_side", side == Side::After)),
            );
            let title = match side {
                Side::Before => format!("Imported ({} nodes)", loaded.before.graph.node_count()),
                Side::After => {
                    let passes = loaded.passes.len();
                    format!(
                        "After {passes} pass{} ({} nodes)",
                        if passes == 1 { "" } else { "es" },
                        loaded.after.graph.node_count()
                    )
                }
            };
            child.strong(title);
            let frame = egui::Frame::canvas(child.style()).inner_margin(0.0);
            frame.show(&mut child, |ui| {
                let canvas = Rect::from_min_size(ui.cursor().min, ui.available_size());
                ui.set_min_size(canvas.size());
                let (drawn, view) = match side {
                    Side::Before => (self.before.as_mut(), &mut self.view_before),
                    Side::After => (self.after.as_mut(), &mut self.view_after),
                };
                let Some(drawn) = drawn else { return };
                if drawn.fit(canvas.size()) || view.is_none() {
                    *view = Some(Viewport::fit(drawn.layout.bounds, canvas.size()));
                }
                let Some(view) = view.as_mut() else { return };
                // Drag pans, scrolling pans, ctrl + scroll (or pinch) zooms.
                let bg = ui.interact(
                    canvas,
                    ui.scope_id().with(("graph_canvas", side == Side::After)),
                    egui::Sense::click_and_drag(),
                );
                if bg.dragged() {
                    view.pan(bg.drag_delta());
                }
                if let (true, Some(pointer)) = (
                    ui.rect_contains_pointer(canvas),
                    ui.input(|i| i.pointer.hover_pos()),
                ) {
                    let (zoom, scroll) = ui.input(|i| (i.zoom_delta(), i.smooth_scroll_delta));
                    if zoom != 1.0 {
                        view.zoom_at(canvas.min, pointer, zoom);
                    }
                    if scroll != egui::Vec2::ZERO {
                        view.pan(scroll);
                    }
                }
                let path = match side {
                    Side::After => self.path.as_ref(),
                    Side::Before => None,
                };
                let selected = self.selected.clone();
                let mut inner = ui.new_child(egui::UiBuilder::new().max_rect(canvas));
                inner.set_clip_rect(canvas.intersect(ui.clip_rect()));
                let canvas_click = if bg.clicked() {
                    bg.interact_pointer_pos()
                } else {
                    None
                };
                if let Some(s) = draw_graph(
                    &mut inner,
                    side,
                    drawn,
                    *view,
                    canvas,
                    path,
                    selected.as_ref(),
                    dark,
                    canvas_click,
                ) {
                    clicked = Some(s);
                }
            });
        }
        if let Some(s) = clicked {
            self.selected = Some(s);
        }
    }

    fn details_panel(&mut self, ui: &mut Ui, loaded: &Loaded) {
        ui.heading("Details");
        if !loaded.passes.is_empty() {
            egui::CollapsingHeader::new("Passes")
                .default_open(true)
                .show(ui, |ui| {
                    for (pass, summary) in &loaded.passes {
                        ui.label(RichText::new(pass).strong());
                        ui.label(summary);
                    }
                });
        }
        let Some(sel) = self.selected.clone() else {
            ui.label("Click a node to see its op, shapes, parameters, FLOPs and weights.");
            return;
        };
        match sel {
            Selection::Node(side, n) => {
                let g = match side {
                    Side::Before => &loaded.before,
                    Side::After => &loaded.after,
                };
                let Some(d) = details(g, n) else {
                    ui.label("The node is no longer in the graph.");
                    return;
                };
                let status = match side {
                    Side::Before => loaded.diff.status_before(&d.name),
                    Side::After => loaded.diff.status_after(&d.name),
                };
                ui.label(RichText::new(&d.name).monospace().strong());
                egui::Grid::new("node_grid").num_columns(2).show(ui, |ui| {
                    ui.label("op");
                    ui.label(d.kind);
                    ui.end_row();
                    ui.label("graph");
                    ui.label(match side {
                        Side::Before => "imported",
                        Side::After => "compiled",
                    });
                    ui.end_row();
                    ui.label("pass status");
                    ui.label(format!("{status:?}"));
                    ui.end_row();
                    ui.label("layer");
                    ui.label(d.layer.map_or("-".to_string(), |l| l.to_string()));
                    ui.end_row();
                    if let Some(t) = &d.tied {
                        let depths: Vec<String> =
                            t.shared_by.iter().map(|d| d.to_string()).collect();
                        ui.label("weights");
                        ui.label(format!(
                            "shared layer {} (depths {})",
                            t.weights,
                            depths.join(", ")
                        ));
                        ui.end_row();
                        ui.label("loop iteration");
                        ui.label(format!(
                            "i{} (number {} of {})",
                            t.iteration,
                            t.iteration + 1,
                            t.shared_by.len()
                        ));
                        ui.end_row();
                    }
                    ui.label("output shape");
                    ui.label(RichText::new(&d.shape).monospace());
                    ui.end_row();
                    ui.label("parameters");
                    ui.label(format!("{} ({})", human(d.params as f64), d.params));
                    ui.end_row();
                    ui.label("FLOPs/token");
                    ui.label(human(d.flops_per_token as f64));
                    ui.end_row();
                    if d.flops_per_context_token > 0 {
                        ui.label("+ per context token");
                        ui.label(human(d.flops_per_context_token as f64));
                        ui.end_row();
                    }
                });
                if !d.inputs.is_empty() {
                    ui.label(RichText::new("Inputs").strong());
                    for (name, shape) in &d.inputs {
                        ui.label(RichText::new(format!("{name} {shape}")).monospace());
                    }
                }
                if !d.adapters.is_empty() {
                    ui.label(RichText::new("Adapters (this iteration's own)").strong());
                    for a in &d.adapters {
                        ui.label(format!(
                            "LoRA on {}: rank {}, scale {}, {} parameters",
                            a.projection,
                            a.rank,
                            a.scale,
                            human(a.params as f64)
                        ));
                    }
                }
                if !d.weights.is_empty() {
                    ui.label(RichText::new("Weights").strong());
                    for w in &d.weights {
                        let shape = match &w.shape {
                            Ok(s) => format!("{s:?}"),
                            Err(e) => e.clone(),
                        };
                        ui.label(format!("{}: {shape}", w.role));
                        ui.label(
                            RichText::new(format!("  = {}", w.recipe))
                                .monospace()
                                .small(),
                        );
                        for t in &w.tensors {
                            // A file beside the checkpoint's (trained heads, adapters) by its
                            // name; the whole path on hover.
                            let (from, path) = match &t.stored {
                                Some((file, dtype, shape)) => {
                                    let name = std::path::Path::new(file).file_name().map_or_else(
                                        || file.clone(),
                                        |n| n.to_string_lossy().into(),
                                    );
                                    (format!("  from {name} ({dtype} {shape:?})"), Some(file))
                                }
                                None => ("  not in the checkpoint".to_string(), None),
                            };
                            let label = ui.label(RichText::new(from).small().weak());
                            if let Some(path) = path {
                                label.on_hover_text(path);
                            }
                        }
                    }
                }
                egui::CollapsingHeader::new("Op fields").show(ui, |ui| {
                    ui.label(RichText::new(&d.attributes).monospace().small());
                });
            }
            Selection::Block(side, first, last) => {
                let g = match side {
                    Side::Before => &loaded.before,
                    Side::After => &loaded.after,
                };
                let nodes: Vec<NodeIndex> = g
                    .graph
                    .node_indices()
                    .filter(|&n| {
                        g.graph[n]
                            .layer
                            .is_some_and(|l| (first..=last).contains(&l))
                    })
                    .collect();
                let (params, flops) = totals(g, &nodes);
                ui.label(RichText::new(format!("layers {first}–{last}")).strong());
                ui.label(format!(
                    "{} layers folded, {} nodes",
                    last - first + 1,
                    nodes.len()
                ));
                ui.label(format!("parameters {}", human(params as f64)));
                ui.label(format!("FLOPs/token {}", human(flops as f64)));
                if ui.button(format!("Unfold layers {first}–{last}")).clicked() {
                    self.expanded.extend(first..=last);
                    self.selected = None;
                    self.relayout();
                }
                ui.horizontal(|ui| {
                    self.expand_layer = self.expand_layer.clamp(first, last);
                    let dv =
                        ui.add(egui::DragValue::new(&mut self.expand_layer).range(first..=last));
                    let unfold = ui.button("Unfold this layer");
                    let _ = dv.labelled_by(unfold.id);
                    if unfold.clicked() {
                        self.expanded.insert(self.expand_layer);
                        self.selected = None;
                        self.relayout();
                    }
                });
            }
            Selection::Loop(side) => {
                let g = match side {
                    Side::Before => &loaded.before,
                    Side::After => &loaded.after,
                };
                let Some(looping) = Looping::of(g) else {
                    ui.label("The graph has no looped block.");
                    return;
                };
                let depths = looping.depths();
                let nodes: Vec<NodeIndex> = g
                    .graph
                    .node_indices()
                    .filter(|&n| g.graph[n].layer.is_some_and(|l| depths.contains(&l)))
                    .collect();
                let (_, flops) = totals(g, &nodes);
                ui.label(RichText::new("looped block").strong());
                ui.label(looping.summary());
                if let Some(a) = looping.adapters() {
                    ui.label(a);
                }
                let drawn = match side {
                    Side::Before => self.before.as_ref(),
                    Side::After => self.after.as_ref(),
                };
                let kinds = drawn.and_then(|d| {
                    d.grouping.items.iter().find_map(|item| match item {
                        Item::Loop { kinds, .. } => Some(kinds.join(" · ")),
                        _ => None,
                    })
                });
                if let Some(kinds) = kinds {
                    ui.label(format!("each layer: {kinds}"));
                }
                let k = looping.block_len;
                for i in 0..looping.loops {
                    ui.label(format!(
                        "iteration i{i}: depths {}–{}",
                        i * k,
                        i * k + k - 1
                    ));
                }
                ui.label(format!(
                    "parameters {} (shared and adapter weights, each counted once)",
                    human(distinct_params(g, &nodes) as f64)
                ));
                ui.label(format!(
                    "FLOPs/token {} (all iterations)",
                    human(flops as f64)
                ));
                if ui.button("Unfold loop").clicked() {
                    self.expanded.extend(depths);
                    self.selected = None;
                    self.relayout();
                }
            }
        }
    }
}

fn legend(ui: &mut Ui, color: Color32, text: &str) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().rect_filled(rect, 2.0, color);
    ui.label(text);
}

/// Draws one graph; returns what was clicked.
#[allow(clippy::too_many_arguments)]
fn draw_graph(
    ui: &mut Ui,
    side: Side,
    drawn: &Drawn,
    view: Viewport,
    canvas: Rect,
    path: Option<&PathHighlight>,
    selected: Option<&Selection>,
    dark: bool,
    canvas_click: Option<egui::Pos2>,
) -> Option<Selection> {
    let painter = ui.painter().clone();
    let visible = ui.clip_rect();
    let origin = canvas.min;
    let zoom = view.zoom;
    let to_screen = |r: Rect| view.rect_to_screen(origin, r);
    let text_color = ui.visuals().text_color();
    let edge_color = ui.visuals().weak_text_color();
    for (col, pos) in drawn.grouping.columns.iter().zip(&drawn.layout.titles) {
        let rect = to_screen(Rect::from_min_size(
            *pos,
            egui::vec2(crate::layout::NODE_W, 20.0),
        ));
        if zoom > 0.3 && visible.intersects(rect) {
            ui.put(
                rect,
                egui::Label::new(
                    RichText::new(&col.title)
                        .size(14.0 * zoom)
                        .color(text_color),
                )
                .selectable(false),
            );
        }
    }
    let on_path = |i: usize| -> Option<bool> {
        let p = path?;
        Some(match &drawn.grouping.items[i] {
            Item::Node(n) => p.nodes.contains(n),
            Item::Block { nodes, .. } | Item::Loop { nodes, .. } => {
                nodes.iter().any(|n| p.nodes.contains(n))
            }
        })
    };
    for (&(a, b), pts) in drawn.grouping.edges.iter().zip(&drawn.layout.curves) {
        let pts = pts.map(|p| view.to_screen(origin, p));
        let bounds = Rect::from_points(&pts);
        if !visible.intersects(bounds.expand(4.0)) {
            continue;
        }
        let hot = on_path(a).unwrap_or(false) && on_path(b).unwrap_or(false);
        let stroke = if hot {
            Stroke::new(2.5, PATH)
        } else {
            Stroke::new(1.2, edge_color)
        };
        painter.add(CubicBezierShape::from_points_stroke(
            pts,
            false,
            Color32::TRANSPARENT,
            stroke,
        ));
    }
    let mut clicked = None;
    for (i, rect) in drawn.layout.rects.iter().enumerate() {
        let rect = to_screen(*rect);
        if !visible.intersects(rect) {
            continue;
        }
        let sel = match (&drawn.grouping.items[i], selected) {
            (Item::Node(n), Some(Selection::Node(s, m))) => *s == side && n == m,
            (Item::Block { first, .. }, Some(Selection::Block(s, f, _))) => {
                *s == side && first == f
            }
            (Item::Loop { .. }, Some(Selection::Loop(s))) => *s == side,
            _ => false,
        };
        let mut fill = status_fill(drawn.status[i], dark)
            .unwrap_or(ui.visuals().widgets.inactive.weak_bg_fill);
        let dim = on_path(i) == Some(false);
        if dim {
            fill = fill.gamma_multiply(0.35);
        }
        let stroke = if on_path(i) == Some(true) {
            Stroke::new(3.0, PATH)
        } else if sel {
            Stroke::new(2.5, ui.visuals().selection.stroke.color)
        } else {
            Stroke::new(1.0, edge_color)
        };
        let item = || match &drawn.grouping.items[i] {
            Item::Node(n) => Selection::Node(side, *n),
            Item::Block { first, last, .. } => Selection::Block(side, *first, *last),
            Item::Loop { .. } => Selection::Loop(side),
        };
        if let Item::Loop { looping, .. } = &drawn.grouping.items[i] {
            let hot = on_path(i) == Some(true);
            let color = if hot { PATH } else { edge_color };
            loop_arrow(&painter, rect, looping.loops, zoom, color, text_color);
        }
        if zoom <= 0.35 {
            // Zoomed far out: plain boxes (no text to read), clicked through the canvas.
            painter.rect(rect, 2.0, fill, stroke, egui::StrokeKind::Inside);
            if canvas_click.is_some_and(|p| rect.contains(p)) {
                clicked = Some(item());
            }
            continue;
        }
        let label = match (&drawn.grouping.items[i], path.and_then(|p| p.iterations)) {
            (Item::Loop { .. }, Some(run)) if on_path(i) == Some(true) => {
                format!("{}\npath: {run}", drawn.labels[i])
            }
            _ => drawn.labels[i].clone(),
        };
        let mut text = RichText::new(label).size(11.0 * zoom);
        if dim {
            text = text.weak();
        }
        let button = egui::Button::new(text)
            .fill(fill)
            .stroke(stroke)
            .corner_radius(4.0)
            .selected(sel);
        if ui.put(rect, button).clicked() {
            clicked = Some(item());
        }
    }
    clicked
}

/// The loop-back arrow under a looped block's box (screen `rect`): from its bottom right back
/// to its bottom left, marked with the loop count.
fn loop_arrow(
    painter: &egui::Painter,
    rect: Rect,
    loops: usize,
    zoom: f32,
    color: Color32,
    text: Color32,
) {
    let dy = (crate::layout::LOOP_ARROW_H - 4.0) * zoom;
    let inset = rect.width() * 0.2;
    let from = egui::pos2(rect.right() - inset, rect.bottom());
    let to = egui::pos2(rect.left() + inset, rect.bottom());
    let stroke = Stroke::new(2.0, color);
    painter.add(CubicBezierShape::from_points_stroke(
        [
            from,
            from + egui::vec2(0.0, dy),
            to + egui::vec2(0.0, dy),
            to,
        ],
        false,
        Color32::TRANSPARENT,
        stroke,
    ));
    // The arrowhead points up, back into the block.
    let head = 5.0 * zoom;
    painter.line_segment([to, to + egui::vec2(-head, head * 1.4)], stroke);
    painter.line_segment([to, to + egui::vec2(head, head * 1.4)], stroke);
    painter.text(
        from + egui::vec2(6.0 * zoom, dy * 0.5),
        egui::Align2::LEFT_CENTER,
        format!("×{loops}"),
        egui::FontId::proportional(12.0 * zoom),
        text,
    );
}
