//! Minimal PNG line/scatter chart rendering (e.g. speedup vs. agreement curves).
//!
//! Text is rendered with a font bundled in the binary (Ubuntu Light from
//! `epaint_default_fonts`), so no system fonts or fontconfig are needed.
//! The bitmap is rendered in memory by `plotters` and encoded with `png`,
//! then written to a temporary file next to the target and renamed into place.

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use anyhow::{anyhow, bail, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

/// One curve: a name for the legend and its points (x, y), drawn as a line with markers.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (else markers only, for noisy measurements).
    pub line: bool,
}

/// A series after dropping non-finite points: name, points, joined by a line.
type Clean<'a> = (&'a str, Vec<(f64, f64)>, bool);

/// Font family name under which the bundled font is registered.
const FONT_FAMILY: &str = "sans-serif";

/// Distinct, colour-blind-friendly-ish palette (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the bundled font with plotters once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(
            FONT_FAMILY,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("failed to load the bundled chart font"))
    }
}

/// Bitmap backend whose text rendering honours glyph side bearings.
///
/// plotters 0.3.7's `ab_glyph` text path drops each glyph's left side bearing,
/// which gives visibly uneven letter spacing ("lar ge val ues") at small
/// sizes. This wrapper delegates all drawing to [`BitMapBackend`] but lays
/// out and rasterises text itself with the same bundled font.
struct TextBackend<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

type BackendResult<T = ()> =
    Result<T, DrawingErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

impl TextBackend<'_> {
    /// Text extent (width, height) in pixels, unrotated.
    fn text_extent(&self, text: &str, size: f64) -> (i32, i32) {
        let font = self.font.as_scaled(PxScale::from(size as f32));
        let mut width = 0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            prev = Some(id);
        }
        let height = font.ascent() - font.descent();
        (width.ceil() as i32, height.ceil() as i32)
    }
}

impl DrawingBackend for TextBackend<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> BackendResult {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> BackendResult {
        self.inner.present()
    }
    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> BackendResult {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> BackendResult {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> BackendResult {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> BackendResult {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> BackendResult {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> BackendResult {
        self.inner.fill_polygon(vert, style)
    }
    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> BackendResult {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> BackendResult<(u32, u32)> {
        let (w, h) = self.text_extent(text, style.size());
        Ok((w.max(0) as u32, h.max(0) as u32))
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> BackendResult {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let size = style.size();
        let (width, height) = self.text_extent(text, size);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let scale = PxScale::from(size as f32);
        let font = self.font.as_scaled(scale);
        let baseline = font.ascent();

        // Rasterise into (x, y, coverage) relative to the text box's top left.
        let mut coverage: Vec<(i32, i32, f32)> = Vec::new();
        let mut caret = 0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                caret += font.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(scale, point(caret, baseline));
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                let (bx, by) = (b.min.x as i32, b.min.y as i32);
                outline.draw(|x, y, c| coverage.push((bx + x as i32, by + y as i32, c)));
            }
            caret += font.h_advance(id);
        }
        for (x, y, c) in coverage {
            if c <= 0.0 {
                continue;
            }
            let (tx, ty) = trans.transform(x + dx, y + dy);
            let px = BackendColor {
                alpha: color.alpha * f64::from(c.min(1.0)),
                rgb: color.rgb,
            };
            self.inner.draw_pixel((pos.0 + tx, pos.1 + ty), px)?;
        }
        Ok(())
    }
}

/// Axis range covering `lo..=hi` with a small margin; never empty.
fn padded_range(lo: f64, hi: f64) -> Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 && span.is_finite() {
        span * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    (lo - pad)..(hi + pad)
}

/// Tick step plotters will use for at most `max_ticks` labels over `range`
/// (plotters picks steps of 1, 2 or 5 times a power of ten).
fn tick_step(range: &Range<f64>, max_ticks: usize) -> f64 {
    let (lo, hi) = (range.start, range.end);
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) || max_ticks == 0 {
        return 1.0;
    }
    let count = |step: f64| ((hi / step).floor() - (lo / step).ceil() + 1.0).max(0.0);
    let mut magnitude = 10f64.powf(span.log10().ceil());
    let mut best = magnitude;
    // Finest 1/2/5 step still yielding no more than `max_ticks` labels.
    for _ in 0..40 {
        for mantissa in [1.0, 0.5, 0.2] {
            let step = magnitude * mantissa;
            if count(step) > max_ticks as f64 {
                return best;
            }
            best = step;
        }
        magnitude /= 10.0;
    }
    best
}

/// Number of decimals that shows ticks over `range` exactly, without float
/// noise such as "0.30000000000000004".
fn tick_decimals(range: &Range<f64>, max_ticks: usize) -> usize {
    let step = tick_step(range, max_ticks);
    let d = -(step.log10() + 1e-9).floor();
    // Bounded to 0..=12, so the cast is exact.
    d.clamp(0.0, 12.0) as usize
}

/// Legend corner overlapping the fewest data samples (points and segments),
/// preferring upper right, then lower left (usually empty for
/// speedup-vs-agreement curves), lower right, upper left.
fn legend_position(
    series: &[Clean<'_>],
    x_range: &Range<f64>,
    y_range: &Range<f64>,
) -> SeriesLabelPosition {
    let norm = |(x, y): (f64, f64)| {
        (
            (x - x_range.start) / (x_range.end - x_range.start),
            (y - y_range.start) / (y_range.end - y_range.start),
        )
    };
    let mut samples = Vec::new();
    for (_, pts, _) in series {
        samples.extend(pts.iter().map(|&p| norm(p)));
        for pair in pts.windows(2) {
            let (a, b) = (norm(pair[0]), norm(pair[1]));
            for i in 1..20 {
                let t = f64::from(i) / 20.0;
                samples.push((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t));
            }
        }
    }
    // Approximate legend box in normalised plot coordinates.
    let box_w = 0.4;
    let box_h = (0.08 * series.len() as f64 + 0.06).min(0.9);
    let candidates = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerLeft, false, false),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
    ];
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (pos, right, upper) in candidates {
        let hits = samples
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x >= 1.0 - box_w } else { x <= box_w };
                let in_y = if upper { y >= 1.0 - box_h } else { y <= box_h };
                in_x && in_y
            })
            .count();
        if hits < best.1 {
            best = (pos, hits);
        }
    }
    best.0
}

/// Writes a chart to `path` as PNG (width x height pixels): title, labelled axes
/// with tick labels, a legend, one colour per series. Writes to a temporary file
/// next to `path` and renames it into place (atomic). Non-finite points are
/// skipped; having no finite point at all is an error. Errors name the path.
pub fn line_chart_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    size: (u32, u32),
) -> anyhow::Result<()> {
    render_and_write(path, title, x_label, y_label, series, size)
        .with_context(|| format!("failed to write chart {}", path.display()))
}

fn render_and_write(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    size: (u32, u32),
) -> anyhow::Result<()> {
    let (w, h) = size;
    if w < 64 || h < 64 {
        bail!("chart size {w}x{h} is too small (minimum 64x64)");
    }
    let buf_len = (w as usize)
        .checked_mul(h as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| anyhow!("chart size {w}x{h} is too large"))?;

    // Keep only finite points; drop series that end up empty.
    let clean: Vec<Clean<'_>> = series
        .iter()
        .map(|s| {
            let pts = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect::<Vec<_>>();
            (s.name.as_str(), pts, s.line)
        })
        .filter(|(_, pts, _)| !pts.is_empty())
        .collect();
    if clean.is_empty() {
        bail!("no finite data points to plot");
    }

    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in clean.iter().flat_map(|(_, pts, _)| pts.iter().copied()) {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
        y_lo = y_lo.min(y);
        y_hi = y_hi.max(y);
    }
    let x_range = padded_range(x_lo, x_hi);
    let mut y_range = padded_range(y_lo, y_hi);
    // Headroom above the data for the legend (one line per series), so it covers no point.
    let legend_share = (0.07 * clean.len() as f64 + 0.05).min(0.6);
    let span = y_range.end - y_range.start;
    y_range.end += span * legend_share / (1.0 - legend_share);

    ensure_font()?;
    let mut pixels = vec![0u8; buf_len];
    draw(
        &mut pixels,
        (w, h),
        title,
        x_label,
        y_label,
        &clean,
        x_range,
        y_range,
    )?;
    write_png_atomic(path, &pixels, (w, h))
}

#[allow(clippy::too_many_arguments)]
fn draw(
    pixels: &mut [u8],
    (w, h): (u32, u32),
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Clean<'_>],
    x_range: Range<f64>,
    y_range: Range<f64>,
) -> anyhow::Result<()> {
    // Scale text and margins with the image, based on the smaller dimension.
    // Never below the 500 px baseline so small charts keep legible text.
    let unit = (f64::from(w.min(h)) / 500.0).max(1.0);
    let px = |v: f64| (v * unit).round().max(1.0);
    let title_size = px(22.0);
    let label_size = px(16.0);
    let tick_size = px(13.0);
    let legend_size = px(14.0);
    let marker = px(3.5) as u32;
    let stroke = px(2.0) as u32;

    const X_TICKS: usize = 10;
    const Y_TICKS: usize = 8;
    let x_dec = tick_decimals(&x_range, X_TICKS);
    let y_dec = tick_decimals(&y_range, Y_TICKS);
    let legend_pos = legend_position(series, &x_range, &y_range);
    // Room for the widest y tick label plus the rotated axis description.
    let widest = [y_range.start, y_range.end]
        .iter()
        .map(|v| format!("{v:.y_dec$}").chars().count())
        .max()
        .unwrap_or(4);
    let y_area = (widest as f64 * 0.6 * tick_size + 1.6 * label_size + 12.0).max(px(56.0));

    let font = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT)
        .map_err(|e| anyhow!("invalid bundled font: {e}"))?;
    let backend = TextBackend {
        inner: BitMapBackend::with_buffer(pixels, (w, h)),
        font,
    };
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;

    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, title_size).into_font())
        .margin(px(16.0) as u32)
        .x_label_area_size(px(48.0) as u32)
        .y_label_area_size(y_area as u32)
        .build_cartesian_2d(x_range, y_range)
        .map_err(plot_err)?;

    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(X_TICKS)
        .y_labels(Y_TICKS)
        .x_label_formatter(&|v| format!("{v:.x_dec$}"))
        .y_label_formatter(&|v| format!("{v:.y_dec$}"))
        .label_style((FONT_FAMILY, tick_size).into_font())
        .axis_desc_style((FONT_FAMILY, label_size).into_font())
        .light_line_style(RGBColor(242, 242, 242))
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()
        .map_err(plot_err)?;

    for (i, (name, pts, line)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line_style = color.stroke_width(stroke);
        let drawn = if *line {
            chart.draw_series(LineSeries::new(pts.iter().copied(), line_style))
        } else {
            chart.draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, marker + marker / 2, color.filled())),
            )
        };
        let legend_marker = marker;
        let joined = *line;
        drawn.map_err(plot_err)?.label(*name).legend(move |(x, y)| {
            if joined {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(stroke)).into_dyn()
            } else {
                Circle::new(
                    (x + 10, y),
                    legend_marker + legend_marker / 2,
                    color.filled(),
                )
                .into_dyn()
            }
        });
        if *line {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, marker, color.filled())))
                .map_err(plot_err)?;
        }
    }

    chart
        .configure_series_labels()
        .position(legend_pos)
        .label_font((FONT_FAMILY, legend_size).into_font())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .draw()
        .map_err(plot_err)?;

    root.present().map_err(plot_err)?;
    Ok(())
}

/// One panel of a heatmap: a name above it, row and column labels, and a share in 0..=1
/// (or none) per cell, `values[row][col]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatPanel {
    pub name: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
}

/// Red (0) through yellow (0.5) to green (1).
pub fn share_color(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let (a, b, t) = if v < 0.5 {
        ((215.0, 48.0, 39.0), (254.0, 224.0, 139.0), v / 0.5)
    } else {
        ((254.0, 224.0, 139.0), (26.0, 152.0, 80.0), (v - 0.5) / 0.5)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Writes panels of share heatmaps side by side to `path` as PNG (temp file, then rename):
/// each cell coloured red to green by its share and labelled with it in percent, grey
/// when it has no value. `x_label` names the columns, `y_label` the rows.
pub fn heatmap_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    panels: &[HeatPanel],
    size: (u32, u32),
) -> anyhow::Result<()> {
    render_heatmap(path, title, x_label, y_label, panels, size)
        .with_context(|| format!("failed to write heatmap {}", path.display()))
}

fn render_heatmap(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    panels: &[HeatPanel],
    (w, h): (u32, u32),
) -> anyhow::Result<()> {
    if w < 64 || h < 64 {
        bail!("heatmap size {w}x{h} is too small (minimum 64x64)");
    }
    if panels.is_empty() {
        bail!("no panel to draw");
    }
    for p in panels {
        if p.values.len() != p.rows.len() || p.values.iter().any(|r| r.len() != p.cols.len()) {
            bail!(
                "panel {}: values do not match its {} rows and {} columns",
                p.name,
                p.rows.len(),
                p.cols.len()
            );
        }
        if p.rows.is_empty() || p.cols.is_empty() {
            bail!("panel {} has no cell", p.name);
        }
    }
    ensure_font()?;
    let mut pixels = vec![0u8; (w as usize) * (h as usize) * 3];
    {
        let font = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT)
            .map_err(|e| anyhow!("invalid bundled font: {e}"))?;
        let backend = TextBackend {
            inner: BitMapBackend::with_buffer(&mut pixels, (w, h)),
            font,
        };
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let unit = (f64::from(w.min(h)) / 500.0).max(1.0);
        let px = |v: f64| (v * unit).round().max(1.0);
        let text = |size: f64, h: HPos, v: VPos| {
            (FONT_FAMILY, size)
                .into_font()
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(h, v))
        };
        let (wi, hi) = (w as i32, h as i32);
        root.draw(&Text::new(
            title.to_string(),
            (wi / 2, px(14.0) as i32),
            text(px(20.0), HPos::Center, VPos::Top),
        ))
        .map_err(plot_err)?;
        let left = px(70.0) as i32;
        let top = px(80.0) as i32;
        let bottom = hi - px(60.0) as i32;
        let gap = px(24.0) as i32;
        let n = panels.len() as i32;
        let panel_w = (wi - left - px(16.0) as i32 - gap * (n - 1)) / n;
        for (i, p) in panels.iter().enumerate() {
            let x0 = left + i as i32 * (panel_w + gap);
            let cw = panel_w / p.cols.len() as i32;
            let ch = (bottom - top) / p.rows.len() as i32;
            root.draw(&Text::new(
                p.name.clone(),
                (x0 + panel_w / 2, top - px(8.0) as i32),
                text(px(16.0), HPos::Center, VPos::Bottom),
            ))
            .map_err(plot_err)?;
            for (r, row) in p.values.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    let (cx, cy) = (x0 + c as i32 * cw, top + r as i32 * ch);
                    let fill = v.map_or(RGBColor(220, 220, 220), share_color);
                    root.draw(&Rectangle::new(
                        [(cx, cy), (cx + cw - 1, cy + ch - 1)],
                        fill.filled(),
                    ))
                    .map_err(plot_err)?;
                    if let Some(v) = v {
                        root.draw(&Text::new(
                            format!("{:.0}", 100.0 * v),
                            (cx + cw / 2, cy + ch / 2),
                            text(px(11.0), HPos::Center, VPos::Center),
                        ))
                        .map_err(plot_err)?;
                    }
                }
            }
            for (c, label) in p.cols.iter().enumerate() {
                root.draw(&Text::new(
                    label.clone(),
                    (x0 + c as i32 * cw + cw / 2, bottom + px(6.0) as i32),
                    text(px(11.0), HPos::Center, VPos::Top),
                ))
                .map_err(plot_err)?;
            }
            if i == 0 {
                for (r, label) in p.rows.iter().enumerate() {
                    root.draw(&Text::new(
                        label.clone(),
                        (left - px(6.0) as i32, top + r as i32 * ch + ch / 2),
                        text(px(12.0), HPos::Right, VPos::Center),
                    ))
                    .map_err(plot_err)?;
                }
            }
        }
        root.draw(&Text::new(
            x_label.to_string(),
            (left + (wi - left) / 2, hi - px(8.0) as i32),
            text(px(14.0), HPos::Center, VPos::Bottom),
        ))
        .map_err(plot_err)?;
        root.draw(&Text::new(
            y_label.to_string(),
            (px(8.0) as i32, top - px(30.0) as i32),
            text(px(14.0), HPos::Left, VPos::Bottom),
        ))
        .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    write_png_atomic(path, &pixels, (w, h))
}

/// plotters' error types borrow the backend's lifetime-free error but are not
/// always `Send + Sync + 'static`-friendly for anyhow; flatten to a message.
fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// Encodes RGB8 `pixels` as PNG into a temp file beside `path`, then renames it.
fn write_png_atomic(path: &Path, pixels: &[u8], (w, h): (u32, u32)) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("output path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| -> anyhow::Result<()> {
        let file = File::create(&tmp)
            .with_context(|| format!("creating temporary file {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(pixels)?;
            writer.finish()?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "plotpng-test-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn two_series() -> Vec<Series> {
        vec![
            Series {
                name: "threshold sweep".into(),
                points: vec![(1.0, 1.0), (1.4, 0.995), (1.9, 0.97), (2.6, 0.91)],
                line: true,
            },
            Series {
                name: "learned exits".into(),
                points: vec![
                    (1.0, 1.0),
                    (1.6, 0.998),
                    (2.2, 0.985),
                    (f64::NAN, 0.5),
                    (3.1, 0.94),
                ],
                line: true,
            },
        ]
    }

    #[test]
    fn renders_valid_png_of_requested_size() {
        let dir = temp_dir("ok");
        let path = dir.join("chart.png");
        line_chart_png(
            &path,
            "Speedup vs agreement",
            "speedup",
            "agreement",
            &two_series(),
            (640, 480),
        )
        .unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((width, height), (640, 480));

        // Decode fully and check the image is not blank.
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (640, 480));
        let px = &buf[..info.buffer_size()];
        let colours: HashSet<&[u8]> = px.chunks_exact(3).collect();
        assert!(
            colours.len() > 20,
            "only {} distinct colours",
            colours.len()
        );
        let non_white = px.chunks_exact(3).filter(|c| *c != [255, 255, 255]).count();
        assert!(non_white > 2_000, "only {non_white} non-white pixels");
        // Both series colours must appear.
        for c in &PALETTE[..2] {
            assert!(px.chunks_exact(3).any(|p| p == [c.0, c.1, c.2]));
        }

        // No temp file left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn share_colours_run_red_yellow_green() {
        assert_eq!(share_color(0.0), RGBColor(215, 48, 39));
        assert_eq!(share_color(0.5), RGBColor(254, 224, 139));
        assert_eq!(share_color(1.0), RGBColor(26, 152, 80));
        assert_eq!(share_color(2.0), share_color(1.0));
        assert_eq!(share_color(0.25), RGBColor(235, 136, 89));
    }

    #[test]
    fn heatmap_cells_take_their_share_colour() {
        let dir = temp_dir("heat");
        let path = dir.join("heat.png");
        let panel = |name: &str, v: f64| HeatPanel {
            name: name.into(),
            rows: vec!["512".into(), "1024".into()],
            cols: vec!["0%".into(), "100%".into()],
            values: vec![vec![Some(v), Some(1.0)], vec![None, Some(0.0)]],
        };
        heatmap_png(
            &path,
            "needle",
            "depth",
            "tokens",
            &[panel("GemFilter", 0.0), panel("full", 0.5)],
            (640, 400),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (640, 400));
        let px = &buf[..info.buffer_size()];
        let count = |c: RGBColor| px.chunks_exact(3).filter(|p| *p == [c.0, c.1, c.2]).count();
        // Cells: red 2 + 1, green 1 + 1, yellow 0 + 1, grey 1 + 1, each a block of its
        // colour (less its label), all of one size.
        let (red, green, yellow) = (
            count(share_color(0.0)),
            count(share_color(1.0)),
            count(share_color(0.5)),
        );
        let grey = count(RGBColor(220, 220, 220));
        assert!(yellow > 1000, "yellow {yellow}");
        let near = |n: usize, cells: f64| (n as f64 / yellow as f64 - cells).abs() < 0.15;
        assert!(near(red, 3.0), "red {red} vs yellow {yellow}");
        assert!(near(green, 2.0), "green {green} vs yellow {yellow}");
        assert!(near(grey, 2.0), "grey {grey} vs yellow {yellow}");
        let mut bad = panel("x", 0.0);
        bad.values.pop();
        let e = heatmap_png(&path, "t", "x", "y", &[bad], (300, 200)).unwrap_err();
        assert!(format!("{e:#}").contains("heat.png"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_or_non_finite_data_is_an_error() {
        let dir = temp_dir("empty");
        let path = dir.join("empty.png");
        let err = line_chart_png(&path, "t", "x", "y", &[], (300, 200)).unwrap_err();
        assert!(format!("{err:#}").contains("empty.png"), "{err:#}");

        let nan = [Series {
            name: "nan".into(),
            points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
            line: true,
        }];
        assert!(line_chart_png(&path, "t", "x", "y", &nan, (300, 200)).is_err());
        let no_points = [Series {
            name: "none".into(),
            points: vec![],
            line: true,
        }];
        assert!(line_chart_png(&path, "t", "x", "y", &no_points, (300, 200)).is_err());
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_point_and_flat_values_do_not_panic() {
        let dir = temp_dir("flat");
        let one = [Series {
            name: "one".into(),
            points: vec![(2.0, 0.9)],
            line: true,
        }];
        line_chart_png(&dir.join("one.png"), "one", "x", "y", &one, (320, 240)).unwrap();
        let flat = [Series {
            name: "flat".into(),
            points: vec![(0.0, 0.0), (0.0, 0.0)],
            line: true,
        }];
        line_chart_png(&dir.join("flat.png"), "flat", "x", "y", &flat, (320, 240)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_error_names_path() {
        let path = std::env::temp_dir().join("plotpng-does-not-exist-dir/x/chart.png");
        let err = line_chart_png(&path, "t", "x", "y", &two_series(), (300, 200)).unwrap_err();
        assert!(format!("{err:#}").contains("chart.png"), "{err:#}");
    }

    /// Draws the sample charts (edge cases: one point, tiny ranges, large values) and checks
    /// each is a PNG of the asked size. They go to PLOTPNG_SAMPLE when set, for looking at.
    #[test]
    fn sample_chart() {
        let scratch = tempfile::tempdir().unwrap();
        let out = std::env::var_os("PLOTPNG_SAMPLE")
            .map(PathBuf::from)
            .unwrap_or_else(|| scratch.path().to_path_buf());
        let mut s = two_series();
        s.push(Series {
            name: "random exits (baseline)".into(),
            points: vec![(1.0, 1.0), (1.3, 0.96), (1.7, 0.9), (2.1, 0.83)],
            line: true,
        });
        line_chart_png(
            &out.join("sample.png"),
            "exitgraph eval exits: speedup vs agreement",
            "speedup (x)",
            "top-1 agreement",
            &s,
            (900, 600),
        )
        .unwrap();
        let one = [Series {
            name: "only point".into(),
            points: vec![(1.7, 0.93)],
            line: true,
        }];
        line_chart_png(
            &out.join("edge-one.png"),
            "single point",
            "speedup",
            "agreement",
            &one,
            (400, 300),
        )
        .unwrap();
        let tiny = [
            Series {
                name: "a".into(),
                points: vec![(1.0, 0.9991), (1.01, 0.9993), (1.02, 0.9999)],
                line: true,
            },
            Series {
                name: "b".into(),
                points: (0..50)
                    .map(|i| (1.0 + f64::from(i) * 4e-4, 0.999 + f64::from(i % 7) * 1e-4))
                    .collect(),
                line: true,
            },
        ];
        line_chart_png(
            &out.join("edge-tiny.png"),
            "tiny ranges",
            "x",
            "y",
            &tiny,
            (600, 400),
        )
        .unwrap();
        let big = [Series {
            name: "big".into(),
            points: vec![(0.0, 0.0), (250_000.0, 1.5e6), (1_000_000.0, 3.2e6)],
            line: true,
        }];
        line_chart_png(
            &out.join("edge-big.png"),
            "large values",
            "tokens",
            "latency (ns)",
            &big,
            (600, 400),
        )
        .unwrap();
        for (file, w, h) in [
            ("sample.png", 900u32, 600u32),
            ("edge-one.png", 400, 300),
            ("edge-tiny.png", 600, 400),
            ("edge-big.png", 600, 400),
        ] {
            let bytes = std::fs::read(out.join(file)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{file}");
            // IHDR: width and height, big-endian, at bytes 16..24.
            let dims = (
                u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
                u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
            );
            assert_eq!(dims, (w, h), "{file}");
        }
    }

    #[test]
    fn tick_decimals_match_step() {
        assert_eq!(tick_decimals(&(0.875..3.205), 10), 1);
        assert_eq!(tick_decimals(&(0.82..1.01), 8), 2);
        assert_eq!(tick_decimals(&(0.0..1_000_000.0), 10), 0);
        assert_eq!(tick_decimals(&(0.9990..0.9999), 8), 4);
        assert_eq!(tick_decimals(&(1.0..1.0), 8), 0);
    }
}
