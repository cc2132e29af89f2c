"""Security plugins: access control (rbac) and encryption at rest (encryption)."""
