"""What clients read: response schemas, RFC 9457 problems, reason messages and advice, review images."""
