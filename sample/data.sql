-- Fill the sample schema. psql variable :parents sets the scale (default 20):
--   psql -v parents=10000 -f sample/data.sql     (about 5.2 million rows)
-- Per parent: 1-3 learners (2 on average), 4 enrollments and 48 lesson progress rows per
-- learner, 20 quiz attempts per learner, 120 audit rows per family member. Shared content:
-- max(20, parents/20) courses of 20 lessons, a quiz on every other lesson. Deterministic:
-- the same scale always gives the same rows.
\if :{?parents}
\else
\set parents 20
\endif
\set ON_ERROR_STOP on
SET search_path = elearning, pg_catalog;
BEGIN;
SELECT :parents::int AS p, greatest(20, :parents::int / 20) AS c \gset

INSERT INTO users (id, role, email, display_name, password_hash)
SELECT i, 'admin', 'admin' || i || '@platform.example', 'Admin ' || i, md5('admin' || i)
  FROM generate_series(1, 20) i;
INSERT INTO users (id, role, email, display_name, password_hash)
SELECT 20 + k, 'parent', 'parent' || k || '@family.example', 'Parent ' || k, md5('parent' || k)
  FROM generate_series(1, :p) k;
-- Learners: parent k has 1 + k % 3 of them, numbered after all parents.
INSERT INTO users (id, role, parent_id, email, display_name, password_hash, birth_year)
SELECT 20 + :p + row_number() OVER (ORDER BY k, j), 'learner', 20 + k,
       'learner' || k || '-' || j || '@family.example', 'Learner ' || k || '.' || j,
       md5('learner' || k || j), 2010 + (k + j) % 8
  FROM generate_series(1, :p) k, generate_series(1, 3) j
 WHERE j <= 1 + k % 3;

INSERT INTO courses (id, title, author_id, tags)
SELECT i, 'Course ' || i, 1 + i % 20, ARRAY['level' || (i % 5), 'topic' || (i % 7)]
  FROM generate_series(1, :c) i;
INSERT INTO lessons (id, course_id, position, title, body, prerequisite_id)
SELECT (ci - 1) * 20 + pos, ci, pos, 'Lesson ' || pos || ' of course ' || ci,
       repeat('Lesson text. ', 10),
       CASE WHEN pos > 1 THEN (ci - 1) * 20 + pos - 1 END
  FROM generate_series(1, :c) ci, generate_series(1, 20) pos;
INSERT INTO quizzes (id, lesson_id, title, questions)
SELECT (ci - 1) * 10 + q, (ci - 1) * 20 + 2 * q, 'Quiz ' || q || ' of course ' || ci,
       jsonb_build_array(jsonb_build_object('q', 'question ' || q, 'a', q % 4))
  FROM generate_series(1, :c) ci, generate_series(1, 10) q;

INSERT INTO enrollments (learner_id, course_id, enrolled_at)
SELECT u.id, 1 + (u.id * 37 + e * 101) % :c, timestamptz '2026-01-01' + (u.id % 300) * interval '1 day'
  FROM users u, generate_series(0, 3) e
 WHERE u.role = 'learner'
ON CONFLICT DO NOTHING;
INSERT INTO lesson_progress (enrollment_id, lesson_id, status, score, updated_at)
SELECT en.id, (en.course_id - 1) * 20 + pos, CASE WHEN pos < 12 THEN 'done' ELSE 'started' END,
       ((en.id * 7 + pos * 13) % 10000) / 100.0, en.enrolled_at + pos * interval '1 hour'
  FROM enrollments en, generate_series(1, 12) pos;
-- Attempts: reviewed by an admin, or (every fifth) by the parent of another family.
INSERT INTO quiz_attempts (learner_id, quiz_id, score, answers, reviewed_by, attempted_at)
SELECT u.id, 1 + (u.id * 13 + a * 7) % (:c * 10), ((u.id + a) % 100)::numeric,
       jsonb_build_object('attempt', a), CASE WHEN a % 5 = 0 THEN 21 + (u.parent_id - 20) % :p ELSE 1 + a % 20 END,
       timestamptz '2026-02-01' + a * interval '1 hour'
  FROM users u, generate_series(1, 20) a
 WHERE u.role = 'learner';
INSERT INTO audit_log (user_id, action, at, detail)
SELECT u.id, (ARRAY['login', 'view', 'answer', 'logout'])[1 + n % 4],
       timestamptz '2026-03-01' + n * interval '1 minute', jsonb_build_object('n', n)
  FROM users u, generate_series(1, 120) n
 WHERE u.role <> 'admin';
INSERT INTO audit_log (user_id, action, detail)
SELECT CASE WHEN n % 2 = 0 THEN 1 + n % 20 END, 'maintenance', jsonb_build_object('n', n)
  FROM generate_series(1, 100) n;
INSERT INTO platform_secrets VALUES (1, 'stripe_key', 'sk_live_sample'), (2, 'smtp_password', 'sample');

DO $$
BEGIN
  PERFORM setval(pg_get_serial_sequence('elearning.' || t, 'id'), m)
     FROM (VALUES ('users', (SELECT max(id) FROM users)), ('courses', (SELECT max(id) FROM courses)),
                  ('lessons', (SELECT max(id) FROM lessons)), ('quizzes', (SELECT max(id) FROM quizzes))) v(t, m);
END $$;
COMMIT;
ANALYZE elearning.users, elearning.courses, elearning.lessons, elearning.quizzes, elearning.enrollments,
        elearning.lesson_progress, elearning.quiz_attempts, elearning.audit_log;
