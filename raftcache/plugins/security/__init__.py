"""Security plugins: signed client tokens and access control (`rbac`), values encrypted at
rest (`encryption`). See docs/security.md."""
