//! Progress reporting hook: the engine reports bytes done against a total; the binary
//! draws a bar (or streams JSON lines over the control socket).

pub trait Progress: Send + Sync {
    /// A new phase (`"backup"`, `"restore"`, `"verify"`, ...) of `total` bytes begins.
    fn start(&self, phase: &str, total: u64);
    /// `n` more bytes of the current phase are done.
    fn advance(&self, n: u64);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}
