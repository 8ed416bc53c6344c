//! Loopback in a fresh network namespace, through rtnetlink.

/// Bring `lo` up in the current network namespace.
pub fn loopback_up() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        // lo is always index 1 in a new namespace
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(1).up().build())
            .execute()
            .await
            .map_err(|e| e.to_string())
    })
}
