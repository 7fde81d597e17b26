-- The seed's three sample rows.
INSERT INTO user_logins (username, event_type, event_time, sent_to_kafka) VALUES
('user1', 'login', NOW(), FALSE),
('user2', 'logout', NOW(), FALSE),
('user3', 'login', NOW() - INTERVAL '1 hour', FALSE);
