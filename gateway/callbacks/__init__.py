"""Status callbacks out: the callback URL rules, Standard Webhooks signing and the outbox sender."""
