//! OCI distribution client: references, auth, manifests and blobs.

pub mod client;
pub mod reference;
pub mod types;
