//! OCI distribution client: references, auth, manifests and blobs.

pub mod client;
pub mod reference;
mod tls;
pub mod types;
