-- The sample platform's account scope: a parent's account is the parent's user row and the
-- learners pointing at it, everything they own, and the shared content they use.
SELECT poco_scope_root('elearning.users', 'id = $1 OR parent_id = $1');
SELECT poco_scope_exclude_column('elearning.users', 'password_hash');
SELECT poco_scope_reference('elearning.courses');
SELECT poco_scope_reference('elearning.lessons');
SELECT poco_scope_reference('elearning.quizzes');
SELECT poco_scope_table('elearning.enrollments');
SELECT poco_scope_table('elearning.lesson_progress');
-- quiz_attempts points at users twice (learner, reviewer): the learner owns the attempt.
SELECT poco_scope_table('elearning.quiz_attempts', via => 'learner_id');
SELECT poco_scope_table('elearning.audit_log');
