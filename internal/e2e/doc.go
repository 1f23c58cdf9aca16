// Package e2e holds vmbond's end-to-end and attack tests: a real management
// server, real agents, the tenant's client, and real QEMU guests, all on this
// machine. Hostile server behaviour is injected with proxies in front of the
// real server and agents, or by calling an agent's API directly.
package e2e
