//! The `memento` binary's parts: the command line ([`cli`]) and the REST API
//! with its dashboard ([`api`]). Both stand on the `memento` library's public
//! API only, the same API an embedding service uses; this is the only crate
//! that knows about terminals, HTTP servers and HTTP clients.
pub mod api;
pub mod cli;
