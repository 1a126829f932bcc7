//! Zoom and pan of a drawing: graph coordinates to screen coordinates and back.

use eframe::egui::{pos2, Pos2, Rect, Vec2};

/// `screen = origin + offset + graph × zoom`, where `origin` is the canvas's top-left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Viewport {
    pub zoom: f32,
    pub offset: Vec2,
}

pub const MIN_ZOOM: f32 = 0.05;
pub const MAX_ZOOM: f32 = 4.0;

impl Viewport {
    /// Shows all of `bounds` centred in a canvas of `size`, no larger than 1:1.
    pub fn fit(bounds: Rect, size: Vec2) -> Self {
        if !bounds.is_positive() || size.x <= 0.0 || size.y <= 0.0 {
            return Viewport {
                zoom: 1.0,
                offset: Vec2::ZERO,
            };
        }
        let zoom = (size.x / bounds.width())
            .min(size.y / bounds.height())
            .clamp(MIN_ZOOM, 1.0);
        let drawn = bounds.size() * zoom;
        let offset = (size - drawn) / 2.0 - bounds.min.to_vec2() * zoom;
        Viewport { zoom, offset }
    }

    pub fn to_screen(&self, origin: Pos2, p: Pos2) -> Pos2 {
        origin + self.offset + p.to_vec2() * self.zoom
    }

    pub fn rect_to_screen(&self, origin: Pos2, r: Rect) -> Rect {
        Rect::from_min_max(self.to_screen(origin, r.min), self.to_screen(origin, r.max))
    }

    pub fn to_graph(&self, origin: Pos2, p: Pos2) -> Pos2 {
        let v = (p - origin - self.offset) / self.zoom;
        pos2(v.x, v.y)
    }

    /// Zooms by `factor` keeping the graph point under `pointer` where it is.
    pub fn zoom_at(&mut self, origin: Pos2, pointer: Pos2, factor: f32) {
        let anchor = self.to_graph(origin, pointer);
        self.zoom = (self.zoom * factor).clamp(MIN_ZOOM, MAX_ZOOM);
        self.offset = pointer - origin - anchor.to_vec2() * self.zoom;
    }

    pub fn pan(&mut self, delta: Vec2) {
        self.offset += delta;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eframe::egui::vec2;

    #[test]
    fn fit_centres_and_shrinks() {
        let b = Rect::from_min_size(pos2(0.0, 0.0), vec2(1000.0, 500.0));
        let v = Viewport::fit(b, vec2(500.0, 500.0));
        assert_eq!(v.zoom, 0.5);
        let o = pos2(10.0, 20.0);
        let r = v.rect_to_screen(o, b);
        assert_eq!(r.width(), 500.0);
        assert_eq!(r.center(), o + vec2(250.0, 250.0));
        // Never magnified past 1:1 by fitting.
        assert_eq!(Viewport::fit(b, vec2(5000.0, 5000.0)).zoom, 1.0);
        assert_eq!(Viewport::fit(Rect::NOTHING, vec2(5.0, 5.0)).zoom, 1.0);
    }

    #[test]
    fn zoom_keeps_the_point_under_the_pointer() {
        let mut v = Viewport::fit(
            Rect::from_min_size(Pos2::ZERO, vec2(100.0, 100.0)),
            vec2(100.0, 100.0),
        );
        let o = pos2(3.0, 4.0);
        let pointer = pos2(40.0, 70.0);
        let before = v.to_graph(o, pointer);
        v.zoom_at(o, pointer, 2.0);
        assert_eq!(v.zoom, 2.0);
        let after = v.to_graph(o, pointer);
        assert!((before - after).length() < 1e-4);
        v.zoom_at(o, pointer, 1e6);
        assert_eq!(v.zoom, MAX_ZOOM);
        v.pan(vec2(5.0, 0.0));
        assert!((v.to_graph(o, pointer).x - (after.x - 5.0 / MAX_ZOOM)).abs() < 0.3);
    }
}
