//! Messages of the studio's own background threads (file dialogs, session reads), which
//! reach the UI through the worker's event channel as [`Event::App`].

use super::session::Session;
use crate::worker::Event;
use std::path::PathBuf;
use std::sync::Arc;

/// What the studio's background threads report.
#[derive(Debug, Clone)]
pub enum AppMessage {
    /// A file dialog returned (None = dismissed or unavailable).
    FilePicked {
        /// Which field asked.
        target: PickTarget,
        /// The chosen path.
        path: Option<PathBuf>,
    },
    /// A background session read finished: the file and its session, or a one-line error.
    SessionOpened(Result<(PathBuf, Box<Session>), String>),
}

impl AppMessage {
    /// The message as a worker event.
    pub fn into_event(self) -> Event {
        Event::App(Arc::new(self))
    }
}

/// Which path field a file dialog fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PickTarget {
    /// U-Net checkpoint.
    Unet,
    /// U-Net config.
    UnetConfig,
    /// VQ decoder checkpoint.
    Decoder,
    /// VQ decoder config.
    DecoderConfig,
    /// Face-recognition model (for later issues).
    FrModel,
    /// Identity context file.
    Contexts,
    /// Session file to open.
    OpenSession,
    /// Session file to save.
    SaveSession,
    /// PNG export target.
    ExportPng,
    /// Export tab: the generated folder to export.
    DatasetSource,
    /// Export tab: the embeddings file.
    DatasetEmbeddings,
    /// Export tab: the manual rejects file.
    DatasetRejects,
    /// Export tab: the reference embeddings of the leakage check.
    DatasetReference,
    /// Export tab: the destination folder.
    DatasetOut,
    /// Train tab: the training data (ImageFolder or RecordIO folder).
    TrainData,
    /// Train tab: the validation `.bin`.
    TrainVal,
    /// Train tab: the output folder.
    TrainOut,
    /// Identities panel: a photo whose faces become identities.
    Photo,
    /// Identities panel: the folder of the ONNX face models.
    ModelsDir,
}
