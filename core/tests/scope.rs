//! Path inference and predicate checks on hand-built catalogs. The randomized comparison
//! against an independent oracle runs on a real server (pg_test/tests/isolation.rs).

use poco_core::predicate::Predicate;
use poco_core::scope::{
    compile, Catalog, Column, Declarations, Exclusion, ForeignKey, Generated, RefMode, Role, Table,
};
use poco_core::PocoError;

fn pred_err(s: &str) -> String {
    Predicate::parse(s).unwrap_err().to_string()
}

#[test]
fn predicate_accepts_expressions_and_replaces_only_real_parameters() {
    let p = Predicate::parse("id = $1 OR parent_id = $1").unwrap();
    assert_eq!(p.uses(), 2);
    assert_eq!(p.with_param("X"), "id = (X) OR parent_id = (X)");
    // $1 inside strings, quoted names, comments and dollar quotes is not a parameter.
    let p = Predicate::parse("note <> '$1 (' AND \"a$1(\" = $1 -- $1 )\n /* $1 ( /* nested ) */ */ AND x <> $q$ $1 ) $q$").unwrap();
    assert_eq!(p.uses(), 1);
    let p = Predicate::parse("tag <> E'\\' ) $1' AND k = $1").unwrap();
    assert_eq!(p.uses(), 1);
    assert!(Predicate::parse("a$1 = $1").is_ok(), "a$1 is an identifier");
    assert!(Predicate::parse("(id = $1) AND (x IN (1, 2))").is_ok());
}

#[test]
fn predicate_refuses_what_could_escape_its_parentheses() {
    assert!(pred_err("id = $1) OR (true").contains("closes a parenthesis"));
    assert!(pred_err("(id = $1").contains("not closed"));
    assert!(pred_err("id = $1; DROP TABLE users").contains("semicolon"));
    assert!(pred_err("id = $2").contains("$2"));
    assert!(pred_err("id = $10").contains("$10"));
    assert!(pred_err("true").contains("does not use $1"));
    assert!(pred_err("   ").contains("empty"));
    assert!(pred_err("id = '$1").contains("unterminated string"));
    assert!(pred_err("id = $1 /* x").contains("unterminated /*"));
    assert!(pred_err("id = $1 AND x = $t$ y").contains("dollar"));
    assert!(pred_err("\"id = $1").contains("quoted identifier"));
    assert_eq!(
        PocoError::ScopePredicate("x".into()).sqlstate().code(),
        "42601"
    );
}

fn col(attnum: i16, name: &str) -> Column {
    Column {
        attnum,
        name: name.into(),
        ident: name.into(),
        type_sql: "bigint".into(),
        plain: true,
        safe_type: "bigint".into(),
        json: false,
        generated: None,
    }
}

fn table(oid: u32, name: &str, cols: &[&str], pk: usize) -> Table {
    Table {
        oid,
        ident: format!("public.{name}"),
        relkind: 'r',
        columns: cols
            .iter()
            .enumerate()
            .map(|(i, c)| col(i as i16 + 1, c))
            .collect(),
        pk: if pk == 0 {
            None
        } else {
            Some((1..=pk as i16).collect())
        },
        indexes: vec![(1..=pk.max(1) as i16).collect()],
    }
}

fn fk(name: &str, child: u32, cc: &[i16], parent: u32, pc: &[i16]) -> ForeignKey {
    ForeignKey {
        name: name.into(),
        child,
        child_cols: cc.to_vec(),
        parent,
        parent_cols: pc.to_vec(),
    }
}

/// users(1) <- enrollments(2) <- progress(3) -> lessons(4) -> courses(5) -> users (author);
/// notes(6) with author and reviewer; secrets(7) with no FK.
fn elearning() -> Catalog {
    let mut c = Catalog::default();
    for t in [
        table(1, "users", &["id", "parent_id"], 1),
        table(2, "enrollments", &["id", "learner_id", "course_id"], 1),
        table(3, "progress", &["enrollment_id", "lesson_id", "score"], 2),
        table(4, "lessons", &["id", "course_id", "prereq_id"], 1),
        table(5, "courses", &["id", "author_id"], 1),
        table(6, "notes", &["id", "author_id", "reviewer_id"], 1),
        table(7, "secrets", &["id", "value"], 1),
    ] {
        c.tables.insert(t.oid, t);
    }
    c.fks = vec![
        fk("users_parent_fk", 1, &[2], 1, &[1]),
        fk("enr_learner_fk", 2, &[2], 1, &[1]),
        fk("enr_course_fk", 2, &[3], 5, &[1]),
        fk("prog_enr_fk", 3, &[1], 2, &[1]),
        fk("prog_lesson_fk", 3, &[2], 4, &[1]),
        fk("lesson_course_fk", 4, &[2], 5, &[1]),
        fk("lesson_prereq_fk", 4, &[3], 4, &[1]),
        fk("course_author_fk", 5, &[2], 1, &[1]),
        fk("note_author_fk", 6, &[2], 1, &[1]),
        fk("note_reviewer_fk", 6, &[3], 1, &[1]),
    ];
    c
}

fn decls(owned: &[(u32, Option<&str>)], refs: &[(u32, RefMode)]) -> Declarations {
    Declarations {
        root: Some((1, "id = $1 OR parent_id = $1".into())),
        owned: owned
            .iter()
            .map(|(o, v)| (*o, v.map(String::from)))
            .collect(),
        reference: refs.to_vec(),
        excluded: vec![],
    }
}

fn err(c: &Catalog, d: &Declarations) -> (String, String, String) {
    match compile(c, d).unwrap_err() {
        e @ PocoError::Scope { .. } => (
            e.sqlstate().code().to_string(),
            e.to_string(),
            e.hint().unwrap(),
        ),
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn a_chain_through_an_undeclared_table_resolves_and_a_declared_hop_wins() {
    let c = elearning();
    let refs = [(4, RefMode::Referenced), (5, RefMode::Referenced)];
    // progress alone: its only path not through a reference table is via enrollments.
    let s = compile(&c, &decls(&[(3, None)], &refs)).unwrap().unwrap();
    let p = s.table(3).unwrap();
    assert_eq!(
        p.path,
        "public.progress(enrollment_id) → public.enrollments(learner_id) → public.users"
    );
    assert!(
        p.fks.iter().any(|f| f.name == "prog_enr_fk" && !f.sent),
        "enrollments is not sent"
    );
    assert!(p.fks.iter().any(|f| f.name == "prog_lesson_fk" && f.sent));
    // With enrollments declared, its FK becomes an ownership edge the learner gets.
    let s = compile(&c, &decls(&[(3, None), (2, None)], &refs))
        .unwrap()
        .unwrap();
    assert!(s
        .table(3)
        .unwrap()
        .fks
        .iter()
        .any(|f| f.name == "prog_enr_fk" && f.sent));
    assert_eq!(s.key_type, "bigint");
    // Reference tables pointing into the account keep the row but not the FK.
    let courses = s.table(5).unwrap();
    assert!(courses.fks.iter().any(|f| f.name == "course_author_fk"
        && !f.sent
        && f.reason.contains("pointing into an account")));
    let lessons = s.table(4).unwrap();
    assert!(lessons.path.contains("recursively"), "{}", lessons.path);
    assert!(lessons.select_sql.contains("WITH RECURSIVE"));
    // The root's self-reference is not guaranteed by an arbitrary predicate.
    let users = s.table(1).unwrap();
    assert_eq!(users.role, Role::Root);
    assert!(users
        .fks
        .iter()
        .any(|f| f.name == "users_parent_fk" && !f.sent));
}

#[test]
fn ambiguity_lists_the_candidates_and_via_resolves_it() {
    let c = elearning();
    let (code, msg, hint) = err(&c, &decls(&[(6, None)], &[]));
    assert_eq!(code, "42702");
    assert!(
        msg.contains("public.notes(author_id) → public.users"),
        "{msg}"
    );
    assert!(
        msg.contains("public.notes(reviewer_id) → public.users"),
        "{msg}"
    );
    assert!(hint.contains("via"), "{hint}");
    for via in ["author_id", "note_author_fk"] {
        let s = compile(&c, &decls(&[(6, Some(via))], &[]))
            .unwrap()
            .unwrap();
        let n = s.table(6).unwrap();
        assert_eq!(n.path, "public.notes(author_id) → public.users");
        assert!(n.fks.iter().any(|f| f.name == "note_reviewer_fk"
            && !f.sent
            && f.reason.contains("another account")));
    }
    let (code, msg, _) = err(&c, &decls(&[(6, Some("nope"))], &[]));
    assert_eq!(code, "42703");
    assert!(msg.contains("\"nope\""));
    // Without the reference declarations progress has two paths (one via a course's author).
    let (code, msg, _) = err(&c, &decls(&[(3, None)], &[]));
    assert_eq!(code, "42702");
    assert!(
        msg.contains("public.courses(author_id) → public.users"),
        "{msg}"
    );
}

#[test]
fn no_path_no_root_cycles_and_bad_exclusions_are_refused() {
    let c = elearning();
    let (code, msg, hint) = err(&c, &decls(&[(7, None)], &[]));
    assert_eq!(code, "42830");
    assert!(
        msg.contains("no foreign key path leads from public.secrets"),
        "{msg}"
    );
    assert!(hint.contains("poco_scope_reference"));
    let mut d = decls(&[(2, None)], &[]);
    d.root = None;
    assert_eq!(err(&c, &d).0, "55000");
    // A cycle of referenced tables: lessons -> courses -> lessons (add courses.intro_lesson).
    let mut c2 = c.clone();
    c2.tables
        .get_mut(&5)
        .unwrap()
        .columns
        .push(col(3, "intro_lesson_id"));
    c2.fks.push(fk("course_intro_fk", 5, &[3], 4, &[1]));
    let (code, msg, hint) = err(
        &c2,
        &decls(&[], &[(4, RefMode::Referenced), (5, RefMode::Referenced)]),
    );
    assert_eq!(code, "42P17");
    assert!(msg.contains("cycle"), "{msg}");
    assert!(hint.contains("'all'"));
    assert!(compile(
        &c2,
        &decls(&[], &[(4, RefMode::Referenced), (5, RefMode::All)])
    )
    .is_ok());
    // Excluding a key column or a missing column.
    let mut d = decls(&[], &[]);
    d.excluded = vec![Exclusion::named(1, "id")];
    assert_eq!(err(&c, &d).0, "22023");
    // A column that no longer exists stays excluded by name (a column added again under it).
    d.excluded = vec![Exclusion::named(1, "nope")];
    let s = compile(&c, &d).unwrap().unwrap();
    assert!(s
        .table(1)
        .unwrap()
        .warnings
        .iter()
        .any(|w| w.contains("\"nope\" no longer exists")));
}

#[test]
fn exclusions_drop_the_column_its_fk_and_its_pull() {
    let c = elearning();
    let mut d = decls(&[(2, None)], &[(5, RefMode::Referenced)]);
    d.excluded = vec![Exclusion::named(2, "course_id")];
    let s = compile(&c, &d).unwrap().unwrap();
    let e = s.table(2).unwrap();
    assert_eq!(e.columns, vec!["id", "learner_id"]);
    assert_eq!(e.excluded, vec!["course_id"]);
    assert!(e
        .fks
        .iter()
        .any(|f| f.name == "enr_course_fk" && !f.sent && f.reason.contains("excluded")));
    assert!(
        s.table(5).unwrap().path.contains("no rows"),
        "an excluded column pulls nothing"
    );
}

#[test]
fn missing_indexes_on_ownership_paths_are_reported() {
    let c = elearning();
    let s = compile(&c, &decls(&[(2, None)], &[])).unwrap().unwrap();
    let w = &s.table(2).unwrap().warnings;
    assert!(
        w.iter()
            .any(|w| w.contains("no index on public.enrollments(learner_id)")),
        "{w:?}"
    );
    let mut c2 = c.clone();
    c2.tables.get_mut(&2).unwrap().indexes.push(vec![2, 3]);
    let s = compile(&c2, &decls(&[(2, None)], &[])).unwrap().unwrap();
    assert!(s.table(2).unwrap().warnings.is_empty());
}

#[test]
fn ownership_cycles_and_unkeyed_self_references_are_refused() {
    // a(b_id) -> b and b(a_id) -> a, both owned, neither reaching the root.
    let mut c = elearning();
    c.tables.insert(8, table(8, "a", &["id", "b_id"], 1));
    c.tables.insert(9, table(9, "b", &["id", "a_id"], 1));
    c.fks.push(fk("a_b_fk", 8, &[2], 9, &[1]));
    c.fks.push(fk("b_a_fk", 9, &[2], 8, &[1]));
    let (code, msg, hint) = err(&c, &decls(&[(8, None), (9, None)], &[]));
    assert_eq!(code, "42P17");
    assert!(
        msg.contains("public.a")
            && msg.contains("public.b")
            && msg.contains("never to the account root"),
        "{msg}"
    );
    assert!(hint.contains("via"));
    // A referenced table that refers to itself needs a primary key to follow the recursion.
    c.tables.get_mut(&4).unwrap().pk = None;
    let (code, msg, hint) = err(&c, &decls(&[], &[(4, RefMode::Referenced)]));
    assert_eq!(code, "42P16");
    assert!(msg.contains("public.lessons refers to itself"), "{msg}");
    assert!(hint.contains("'all'"));
    assert!(compile(&c, &decls(&[], &[(4, RefMode::All)])).is_ok());
}

/// users(1) with a secret and generated columns: 4 reads the secret, 5 reads the name, 6 calls
/// a user function.
fn with_generated() -> Catalog {
    let mut c = elearning();
    let u = c.tables.get_mut(&1).unwrap();
    u.columns.push(col(3, "secret"));
    u.columns.push(col(4, "name"));
    let gen = |n: i16, name: &str, reads: &[i16], calls: bool| Column {
        generated: Some(Generated {
            reads: reads.to_vec(),
            calls_user_function: calls,
        }),
        ..col(n, name)
    };
    u.columns.push(gen(5, "hint", &[3], false));
    u.columns.push(gen(6, "shout", &[4], false));
    u.columns.push(gen(7, "via_fn", &[1], true));
    c
}

#[test]
fn generated_columns_go_with_what_they_read() {
    let c = with_generated();
    let mut d = decls(&[], &[]);
    let s = compile(&c, &d).unwrap().unwrap();
    assert!(
        s.table(1).unwrap().excluded.is_empty(),
        "nothing excluded, nothing derived"
    );
    d.excluded = vec![Exclusion {
        rel: 1,
        attnum: Some(3),
        name: "secret".into(),
    }];
    let s = compile(&c, &d).unwrap().unwrap();
    let u = s.table(1).unwrap();
    assert_eq!(u.excluded, vec!["secret", "hint", "via_fn"]);
    assert_eq!(u.excluded_attnums, vec![3, 5, 7]);
    assert_eq!(u.columns, vec!["id", "parent_id", "name", "shout"]);
    assert!(u
        .warnings
        .iter()
        .any(|w| w.contains("hint") && w.contains("reads excluded column secret")));
    assert!(u
        .warnings
        .iter()
        .any(|w| w.contains("via_fn") && w.contains("outside pg_catalog")));
    assert!(!u.select_sql.contains("hint") && !u.select_sql.contains("via_fn"));
    // A generated key column that reads an excluded one: refused, not sent.
    let mut c2 = c.clone();
    c2.tables.get_mut(&1).unwrap().pk = Some(vec![5]);
    d.root = None;
    assert_eq!(err(&c2, &d).0, "22023");
}

#[test]
fn an_exclusion_follows_its_column_and_keeps_its_name() {
    let c = with_generated();
    let mut d = decls(&[], &[]);
    let by = |attnum: i16, name: &str| Exclusion {
        rel: 1,
        attnum: Some(attnum),
        name: name.into(),
    };
    // Renamed (number 3 is now called "name"... here: declared as "old", column 3 is "secret").
    d.excluded = vec![by(3, "old")];
    let u = compile(&c, &d).unwrap().unwrap().table(1).unwrap().clone();
    assert!(u.excluded.contains(&"secret".to_string()));
    assert!(u.warnings.iter().any(|w| w.contains("now named secret")));
    // Number and name part (columns renumbered by a restore, or names swapped): both stay.
    d.excluded = vec![by(3, "name")];
    let u = compile(&c, &d).unwrap().unwrap().table(1).unwrap().clone();
    assert!(u.excluded.contains(&"secret".to_string()) && u.excluded.contains(&"name".to_string()));
    assert!(
        u.excluded.contains(&"shout".to_string()),
        "shout reads name"
    );
    // Dropped (no column 9) and added again under its name.
    d.excluded = vec![by(9, "secret")];
    let u = compile(&c, &d).unwrap().unwrap().table(1).unwrap().clone();
    assert!(u.excluded.contains(&"secret".to_string()));
    assert!(u
        .warnings
        .iter()
        .any(|w| w.contains("dropped and added again")));
}

#[test]
fn predicates_may_not_name_the_compiled_queries_own_names() {
    assert!(
        pred_err("id = $1 AND EXISTS (SELECT 1 FROM x poco_p WHERE poco_p.v = id)")
            .contains("poco_p")
    );
    assert!(pred_err("\"poco_r\".id = $1").contains("poco_r"));
    assert!(pred_err("POCO_P.v = $1").contains("POCO_P"));
    assert!(Predicate::parse("poco_root.id = $1 OR parent_id = $1").is_ok());
    assert!(Predicate::parse("id = $1 AND note <> 'poco_p' AND \"xpoco_p\" = 1").is_ok());
    assert!(Predicate::parse("id = $1 AND e'poco_p' = x").is_ok());
}

#[test]
fn the_root_is_poco_root_wherever_its_predicate_is_evaluated() {
    let c = elearning();
    let s = compile(
        &c,
        &decls(
            &[(2, None), (3, None)],
            &[(4, RefMode::Referenced), (5, RefMode::Referenced)],
        ),
    )
    .unwrap()
    .unwrap();
    for t in &s.tables {
        for sql in [&t.select_sql, &t.count_sql, &t.owners_sql] {
            // Every occurrence of the predicate follows a FROM item aliased poco_root.
            let parts: Vec<&str> = sql.split("WHERE (id = ").collect();
            for before in &parts[..parts.len() - 1] {
                let from = before.rsplit("FROM ").next().unwrap();
                assert!(from.contains(" poco_root"), "{}: {from} in {sql}", t.ident);
            }
            assert!(
                parts.len() > 1 || t.role == Role::Reference(RefMode::Referenced),
                "{}: {sql}",
                t.ident
            );
        }
    }
}
