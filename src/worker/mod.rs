//! The studio's worker: one thread that owns the sampling pipeline and runs commands in
//! order, reporting back through events. The UI never touches a model.
//!
//! Data flows one way: settings → [`Command`] → worker → [`Event`] → state → view.

pub mod analyze;
pub mod dataset_export;
pub mod guard;
pub mod identities;
pub mod io;
pub mod job;
pub mod model;
pub mod protocol;
mod thread;
pub mod train;

pub use protocol::{Command, Event, Job, JobCell, JobKind, LoadRequest, ModelInfo, Progress};

use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Called after every event so that the UI wakes up (e.g. `egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Sends events to the UI and wakes it. Cloned into the worker and background threads.
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<Event>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSender")
    }
}

impl EventSender {
    /// Sends one event (dropped silently when the UI is gone) and wakes the UI.
    pub fn send(&self, event: Event) {
        let _ = self.tx.send(event);
        let waker = self.waker.lock().ok().and_then(|w| w.clone());
        if let Some(w) = waker {
            w();
        }
    }
}

/// Handle to the worker thread.
pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    sender: EventSender,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread (no model loaded).
    pub fn spawn() -> Self {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (tx, events) = crossbeam_channel::unbounded();
        let sender = EventSender {
            tx,
            waker: Arc::new(Mutex::new(None)),
        };
        let worker_sender = sender.clone();
        let thread = std::thread::Builder::new()
            .name("idiff-worker".into())
            .spawn(move || thread::run(command_rx, worker_sender))
            .expect("spawning the worker thread");
        Self {
            commands,
            events,
            sender,
            thread: Some(thread),
        }
    }

    /// Sets the function called after every event.
    pub fn set_waker(&self, waker: Waker) {
        if let Ok(mut w) = self.sender.waker.lock() {
            *w = Some(waker);
        }
    }

    /// Queues a command; the worker runs commands one after another.
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// The next pending event, if any (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// A sender for background threads (exports, file dialogs) to report into the same queue.
    pub fn event_sender(&self) -> EventSender {
        self.sender.clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        // A running job is cancelled by its owner; do not block the UI waiting for it.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
