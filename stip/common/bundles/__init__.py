"""The bundle formats, a contract every party reads: what a server, client, enclave or TEE bundle holds, how its
files are named, and how it is checked."""
