"""Identity, pairing, TLS and the RPC tunnel: who may give an agent orders, and how RPC bytes
travel (inside the paired, mutually authenticated channel; never on an open port)."""
