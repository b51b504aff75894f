//! The pure core of the balancer: plain data in, plain data out, the time passed as an argument.
//! Nothing here opens a socket, reads a clock or spawns a task.

pub mod admission;
pub mod framing;
pub mod health;
pub mod retry;
pub mod select;
pub mod timeouts;
