//! How a backbone holds its adapters: an immutable snapshot, replaced on change, so a
//! forward that holds a snapshot finishes on the version it started with.

use adapters_core::AdapterSet;
use std::sync::Arc;

/// Implemented by every backbone; the provided methods are the only way to reach the
/// adapter set.
pub trait HoldsAdapters {
    /// The current snapshot (implementors return their private field).
    fn snapshot_slot(&self) -> &Arc<AdapterSet>;

    /// The current snapshot, to replace (implementors return their private field).
    fn snapshot_slot_mut(&mut self) -> &mut Arc<AdapterSet>;

    /// The attached adapters.
    fn adapters(&self) -> &AdapterSet {
        self.snapshot_slot()
    }

    /// The attached adapters, to change. Forwards that hold an [`Self::adapters_snapshot`]
    /// keep the version they started with: the change goes to a copy.
    fn adapters_mut(&mut self) -> &mut AdapterSet {
        Arc::make_mut(self.snapshot_slot_mut())
    }

    /// An immutable snapshot of the attached adapters (cheap: shared).
    fn adapters_snapshot(&self) -> Arc<AdapterSet> {
        self.snapshot_slot().clone()
    }

    /// Replaces the attached adapters.
    fn set_adapters(&mut self, adapters: Arc<AdapterSet>) {
        *self.snapshot_slot_mut() = adapters;
    }
}
