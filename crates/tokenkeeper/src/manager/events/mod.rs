//! What the engine tells the application: events of this process ([`local`], a broadcast
//! channel) and the fleet's event log read as a stream ([`stream`], which also keeps every
//! process's cache in step with the others' writes).

mod local;
mod stream;

pub use local::{LocalEvent, LocalEventKind};
pub(crate) use stream::ensure_watch;
pub use stream::{EventStream, EventsError};
