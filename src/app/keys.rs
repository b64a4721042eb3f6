//! Keyboard shortcuts of the Generate tab (ignored while a text field has focus).

use super::state::{AppState, Tab};
use crate::worker::Worker;
use egui::{Key, Modifiers};

/// What the keys of this frame asked for that the app must act on.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyOutcome {
    /// The selection moved to this row (scroll it into view).
    pub moved_to_row: Option<usize>,
}

/// Handles Space (run/cancel), R (new seed), arrows (selection), Delete (reject),
/// Enter (zoom) and Escape (back to the grid).
pub fn handle(ctx: &egui::Context, state: &mut AppState, worker: &Worker) -> KeyOutcome {
    let mut out = KeyOutcome::default();
    if ctx.egui_wants_keyboard_input() || state.tab != Tab::Generate {
        return out;
    }
    let pressed = |key: Key| ctx.input_mut(|i| i.consume_key(Modifiers::NONE, key));
    if pressed(Key::Space) {
        state.run_or_cancel(worker);
    }
    if pressed(Key::R) {
        state.new_seed();
    }
    let before = state.selection;
    let moves = [
        (Key::ArrowUp, -1, 0),
        (Key::ArrowDown, 1, 0),
        (Key::ArrowLeft, 0, -1),
        (Key::ArrowRight, 0, 1),
    ];
    for (key, dr, dc) in moves {
        if pressed(key) {
            state.move_selection(dr, dc);
        }
    }
    if state.selection != before {
        out.moved_to_row = state.selection.map(|s| s.0);
    }
    if pressed(Key::Delete) || pressed(Key::Backspace) {
        state.toggle_reject_selected();
    }
    if pressed(Key::Enter) {
        if let Some((r, _)) = state.selection {
            state.zoom = Some(r);
        }
    }
    if pressed(Key::Escape) {
        state.zoom = None;
    }
    out
}
