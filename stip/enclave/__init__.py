"""The enclave party (TEE mode): attestation reports, sealing, the model's secret first and last pieces, and the
`stip enclave` process that serves TEE clients and drives the GPU worker. See docs/tee.md."""
