"""Security plugins: signed client tokens and role-based access control (`rbac`).

See docs/security.md, "Client authentication and access control".
"""
