//! OCI distribution client: references, auth, manifests and blobs.

pub mod reference;
