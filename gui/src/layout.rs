//! Positions for a [`Grouping`]: columns left to right, items top to bottom, edges as cubic
//! curves. Coordinates are in graph space; the view zooms and pans over them.

use crate::collapse::{Grouping, Item};
use eframe::egui::{pos2, vec2, Pos2, Rect};

pub const NODE_W: f32 = 128.0;
pub const NODE_H: f32 = 34.0;
pub const BLOCK_H: f32 = 84.0;
/// A looped block's box; its loop-back arrow takes [`LOOP_ARROW_H`] below it.
pub const LOOP_H: f32 = 96.0;
pub const LOOP_ARROW_H: f32 = 24.0;
const GAP_X: f32 = 44.0;
const GAP_Y: f32 = 12.0;
/// Space between two rows of columns.
const ROW_GAP: f32 = 36.0;
/// Space above the first item of a column, for its title.
pub const TITLE_H: f32 = 26.0;

/// Where every item and edge goes.
#[derive(Clone, Debug)]
pub struct Layout {
    /// One rectangle per item of the grouping, same order.
    pub rects: Vec<Rect>,
    /// Title position (top-left) of each column.
    pub titles: Vec<Pos2>,
    /// Cubic Bézier control points per edge, same order as the grouping's edges.
    pub curves: Vec<[Pos2; 4]>,
    /// Everything drawn.
    pub bounds: Rect,
}

/// Height of an item's box, and the space it takes in its column (box, anything drawn
/// below it, gap).
fn heights(item: Option<&Item>) -> (f32, f32) {
    match item {
        Some(Item::Block { .. }) => (BLOCK_H, BLOCK_H + GAP_Y),
        Some(Item::Loop { .. }) => (LOOP_H, LOOP_H + LOOP_ARROW_H + GAP_Y),
        _ => (NODE_H, NODE_H + GAP_Y),
    }
}

fn column_height(g: &Grouping, c: usize) -> f32 {
    TITLE_H
        + g.columns[c]
            .items
            .iter()
            .map(|&i| heights(g.items.get(i)).1)
            .sum::<f32>()
}

/// Columns per row that make the drawing fill a `view` (width, height) best.
pub fn columns_per_row(g: &Grouping, view: (f32, f32)) -> usize {
    let n = g.columns.len().max(1);
    let tallest = (0..g.columns.len())
        .map(|c| column_height(g, c))
        .fold(0.0, f32::max);
    (1..=n)
        .max_by(|&a, &b| {
            let scale = |k: usize| {
                let rows = n.div_ceil(k) as f32;
                let w = k as f32 * (NODE_W + GAP_X);
                let h = rows * (tallest + ROW_GAP);
                (view.0 / w).min(view.1 / h)
            };
            // Ties go to more columns per row (fewer rows).
            scale(a).total_cmp(&scale(b)).then(a.cmp(&b))
        })
        .unwrap_or(n)
}

/// Lays out a grouping, `per_row` columns to a row (rows of columns top to bottom).
pub fn layout(g: &Grouping, per_row: usize) -> Layout {
    let per_row = per_row.max(1);
    let mut rects = vec![Rect::NOTHING; g.items.len()];
    let mut titles = Vec::with_capacity(g.columns.len());
    let mut bounds = Rect::NOTHING;
    let mut row_top = 0.0;
    let mut row_height: f32 = 0.0;
    for (c, col) in g.columns.iter().enumerate() {
        if c > 0 && c % per_row == 0 {
            row_top += row_height + ROW_GAP;
            row_height = 0.0;
        }
        row_height = row_height.max(column_height(g, c));
        let x = (c % per_row) as f32 * (NODE_W + GAP_X);
        titles.push(pos2(x, row_top));
        let mut y = row_top + TITLE_H;
        for &i in &col.items {
            let (h, taken) = heights(g.items.get(i));
            let r = Rect::from_min_size(pos2(x, y), vec2(NODE_W, h));
            if let Some(slot) = rects.get_mut(i) {
                *slot = r;
            }
            bounds = bounds.union(Rect::from_min_size(r.min, vec2(NODE_W, taken - GAP_Y)));
            y += taken;
        }
        bounds = bounds.union(Rect::from_min_size(pos2(x, row_top), vec2(NODE_W, TITLE_H)));
    }
    let column_of: Vec<usize> = {
        let mut v = vec![0; g.items.len()];
        for (c, col) in g.columns.iter().enumerate() {
            for &i in &col.items {
                if let Some(slot) = v.get_mut(i) {
                    *slot = c;
                }
            }
        }
        v
    };
    let curves = g
        .edges
        .iter()
        .map(|&(a, b)| {
            let (ra, rb) = (rects[a], rects[b]);
            if column_of[a] == column_of[b] {
                if rb.top() > ra.bottom() && rb.top() - ra.bottom() <= GAP_Y + 1.0 {
                    // Neighbours: a short straight drop.
                    let (p, q) = (ra.center_bottom(), rb.center_top());
                    [p, p, q, q]
                } else {
                    // A skip within the column (a residual): bow out to the right.
                    let (p, q) = (ra.right_center(), rb.right_center());
                    let bow = 28.0 + (q.y - p.y).abs() * 0.05;
                    [p, p + vec2(bow, 0.0), q + vec2(bow, 0.0), q]
                }
            } else if rb.left() > ra.right() {
                let (p, q) = (ra.right_center(), rb.left_center());
                let dx = ((q.x - p.x) * 0.5).max(20.0);
                [p, p + vec2(dx, 0.0), q - vec2(dx, 0.0), q]
            } else if matches!(g.items.get(a), Some(Item::Loop { .. })) {
                // Into the next row from a looped block: out of its right side and down past
                // the loop-back arrow under it.
                let (p, q) = (ra.right_center(), rb.center_top());
                let x = p.x + GAP_X * 0.9;
                [p, pos2(x, p.y), pos2(x, q.y - 40.0), q]
            } else {
                // Into the next row of columns: down from the bottom, into the top.
                let (p, q) = (ra.center_bottom(), rb.center_top());
                let dy = ((q.y - p.y).abs() * 0.5).max(30.0);
                [p, p + vec2(0.0, dy), q - vec2(0.0, dy), q]
            }
        })
        .collect();
    Layout {
        rects,
        titles,
        curves,
        bounds: bounds.expand(8.0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::collapse::{group, CollapseOptions};
    use crate::diff::NodeStatus;
    use crate::test_graphs::chain;

    #[test]
    fn every_item_has_a_box_and_no_two_overlap() {
        let g = chain(4);
        let gr = group(&g, |_| NodeStatus::Same, &CollapseOptions::default());
        let l = layout(&gr, usize::MAX);
        assert_eq!(l.rects.len(), gr.items.len());
        assert!(l.rects.iter().all(|r| r.is_positive()));
        for (i, a) in l.rects.iter().enumerate() {
            for b in &l.rects[i + 1..] {
                assert!(!a.intersects(b.shrink(0.5)), "{a:?} overlaps {b:?}");
            }
        }
        assert_eq!(l.curves.len(), gr.edges.len());
        assert!(l.rects.iter().all(|r| l.bounds.contains_rect(*r)));
    }

    #[test]
    fn columns_go_left_to_right() {
        let g = chain(3);
        let gr = group(&g, |_| NodeStatus::Same, &CollapseOptions::default());
        let l = layout(&gr, usize::MAX);
        let xs: Vec<f32> = l.titles.iter().map(|p| p.x).collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn rows_wrap_to_fit_a_tall_view() {
        let g = chain(6);
        let gr = group(&g, |_| NodeStatus::Same, &CollapseOptions::default());
        // Eight columns: a wide view takes them in one row, a tall one in several.
        assert_eq!(columns_per_row(&gr, (4000.0, 400.0)), 8);
        let k = columns_per_row(&gr, (540.0, 750.0));
        assert!(k > 1 && k < 8, "{k}");
        let l = layout(&gr, k);
        for (i, a) in l.rects.iter().enumerate() {
            for b in &l.rects[i + 1..] {
                assert!(!a.intersects(b.shrink(0.5)));
            }
        }
        assert!(l.bounds.height() > layout(&gr, 8).bounds.height());
    }

    #[test]
    fn a_folded_model_of_120_layers_is_small() {
        let g = chain(120);
        let opts = CollapseOptions {
            collapse: true,
            ..Default::default()
        };
        let l = layout(&group(&g, |_| NodeStatus::Same, &opts), usize::MAX);
        assert!(l.bounds.width() < 800.0 && l.bounds.height() < 400.0);
    }

    #[test]
    fn a_looped_block_has_room_below_for_its_loop_arrow() {
        let g = crate::test_graphs::tied_demo(2, Some(16));
        let opts = CollapseOptions {
            loops: true,
            ..Default::default()
        };
        let gr = group(&g, |_| NodeStatus::Same, &opts);
        let i = gr
            .items
            .iter()
            .position(|it| matches!(it, Item::Loop { .. }))
            .unwrap();
        // One column per row: the outputs' title sits below the looped block's arrow.
        let l = layout(&gr, 1);
        let looped = l.rects[i];
        assert_eq!(looped.height(), LOOP_H);
        assert!(l.titles[2].y >= looped.bottom() + LOOP_ARROW_H, "{l:?}");
        let wide = layout(&gr, usize::MAX);
        assert!(wide.bounds.bottom() >= wide.rects[i].bottom() + LOOP_ARROW_H);
    }
}
