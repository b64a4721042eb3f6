//! Debug guard that keeps model work off the UI thread.
//!
//! The studio's `ui()` marks its thread with [`mark_ui_thread`]; the worker's model-loading
//! and sampling entry points `debug_assert!(!on_ui_thread())`, so a future change that
//! calls them from a view fails loudly in debug builds and tests.

use std::cell::Cell;

thread_local! {
    static ON_UI_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the UI thread (called at the top of every frame).
pub fn mark_ui_thread() {
    ON_UI_THREAD.with(|f| f.set(true));
}

/// True when the calling thread has been marked as the UI thread.
pub fn on_ui_thread() -> bool {
    ON_UI_THREAD.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_marked_thread_is_the_ui_thread() {
        std::thread::spawn(|| {
            assert!(!on_ui_thread());
            mark_ui_thread();
            assert!(on_ui_thread());
        })
        .join()
        .unwrap();
        std::thread::spawn(|| assert!(!on_ui_thread()))
            .join()
            .unwrap();
    }
}
