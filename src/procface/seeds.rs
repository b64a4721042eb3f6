//! The ProcFace identity seed spaces: which seeds train the built-in models, which are held
//! out for validation, and which name the new identities the studio, `generate` and the
//! evaluations use. Disjoint ranges, so that no held-out or new identity was ever trained on.

/// First identity seed of held-out (never trained on) ProcFace identities, for validation
/// during training (training uses seeds from 0).
pub const HELD_OUT_FIRST_IDENTITY: u64 = 1_000_000;

/// First identity seed of the new identities of evaluation, the studio and
/// `generate --procface-identities`.
pub const EVAL_FIRST_IDENTITY: u64 = 2_000_000;

/// The identity seed of new identity `index`: [`EVAL_FIRST_IDENTITY`] + index.
pub fn procface_identity_seed(index: usize) -> u64 {
    EVAL_FIRST_IDENTITY + index as u64
}
