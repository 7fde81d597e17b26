//! Classifying a PostgreSQL column's type: [`PgType`], built from the catalog's OID and typmod.

use serde::{Deserialize, Serialize};

/// Builtin type OIDs, from PostgreSQL's src/include/catalog/pg_type.dat (stable across releases:
/// builtin OIDs never change).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const CIDR: u32 = 650;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MACADDR8: u32 = 774;
    pub const MACADDR: u32 = 829;
    pub const INET: u32 = 869;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    // Their array types (`array_type_oid`).
    pub const JSON_ARRAY: u32 = 199;
    pub const CIDR_ARRAY: u32 = 651;
    pub const MACADDR8_ARRAY: u32 = 775;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const BYTEA_ARRAY: u32 = 1001;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const MACADDR_ARRAY: u32 = 1040;
    pub const INET_ARRAY: u32 = 1041;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIME_ARRAY: u32 = 1183;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const INTERVAL_ARRAY: u32 = 1187;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const TIMETZ_ARRAY: u32 = 1270;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSONB_ARRAY: u32 = 3807;
}

/// What the mappings need to know about a column's type.
///
/// Serialised internally tagged: `{"type":"int4"}`, `{"type":"numeric","precision":10,"scale":2}`,
/// `{"type":"array","element":{"type":"text"}}`, `{"type":"enum","name":"mood"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    /// `numeric(p,s)`; both `None` for unconstrained `numeric`. Since PostgreSQL 15 the scale may be
    /// negative or larger than the precision.
    Numeric {
        precision: Option<u16>,
        scale: Option<i16>,
    },
    Float4,
    Float8,
    Text,
    /// `character varying(n)`; `length` is `None` without a limit.
    Varchar {
        length: Option<i32>,
    },
    /// `character(n)` (bpchar); the value keeps its blank padding.
    Char {
        length: Option<i32>,
    },
    /// The citext extension's type: its OID differs per database, so it is recognised by name.
    Citext,
    Uuid,
    Date,
    Time,
    #[serde(rename = "timetz")]
    TimeTz,
    Timestamp,
    #[serde(rename = "timestamptz")]
    TimestampTz,
    Interval,
    Bytea,
    Json,
    Jsonb,
    Inet,
    Cidr,
    #[serde(rename = "macaddr")]
    MacAddr,
    #[serde(rename = "macaddr8")]
    MacAddr8,
    /// An array of `element` (any number of dimensions: PostgreSQL does not enforce the declared ones).
    Array {
        element: Box<PgType>,
    },
    /// A user-defined enum: its label as text.
    Enum {
        name: String,
    },
    /// A domain: mapped as its base type.
    Domain {
        name: String,
        base: Box<PgType>,
    },
    /// Anything else (money, xml, tsvector, ranges, geometric types, composites…): PostgreSQL's text.
    Other {
        name: String,
    },
}

impl PgType {
    /// Classifies a column from `pg_attribute.atttypid`, `atttypmod` and `format_type(…)`.
    ///
    /// Builtin types go by OID. citext goes by name (an extension type, its OID is per database).
    /// An array type this does not know (an enum's array, `mood[]`) becomes an array of `Other`, so
    /// its elements still arrive as text; callers that read `typelem`/`typtype` from the catalog
    /// build [`PgType::Array`] of [`PgType::Enum`] or [`PgType::Domain`] themselves.
    pub fn from_catalog(type_oid: u32, typmod: i32, type_name: &str) -> PgType {
        use oid::*;
        let array = |element: PgType| PgType::Array {
            element: Box::new(element),
        };
        match type_oid {
            BOOL => PgType::Bool,
            INT2 => PgType::Int2,
            INT4 => PgType::Int4,
            INT8 => PgType::Int8,
            NUMERIC => numeric(typmod),
            FLOAT4 => PgType::Float4,
            FLOAT8 => PgType::Float8,
            TEXT => PgType::Text,
            VARCHAR => PgType::Varchar {
                length: char_length(typmod),
            },
            BPCHAR => PgType::Char {
                length: char_length(typmod),
            },
            UUID => PgType::Uuid,
            DATE => PgType::Date,
            TIME => PgType::Time,
            TIMETZ => PgType::TimeTz,
            TIMESTAMP => PgType::Timestamp,
            TIMESTAMPTZ => PgType::TimestampTz,
            INTERVAL => PgType::Interval,
            BYTEA => PgType::Bytea,
            JSON => PgType::Json,
            JSONB => PgType::Jsonb,
            INET => PgType::Inet,
            CIDR => PgType::Cidr,
            MACADDR => PgType::MacAddr,
            MACADDR8 => PgType::MacAddr8,
            // An array column's typmod is its element's (numeric(10,2)[] has numeric's typmod).
            BOOL_ARRAY => array(PgType::Bool),
            INT2_ARRAY => array(PgType::Int2),
            INT4_ARRAY => array(PgType::Int4),
            INT8_ARRAY => array(PgType::Int8),
            NUMERIC_ARRAY => array(numeric(typmod)),
            FLOAT4_ARRAY => array(PgType::Float4),
            FLOAT8_ARRAY => array(PgType::Float8),
            TEXT_ARRAY => array(PgType::Text),
            VARCHAR_ARRAY => array(PgType::Varchar {
                length: char_length(typmod),
            }),
            BPCHAR_ARRAY => array(PgType::Char {
                length: char_length(typmod),
            }),
            UUID_ARRAY => array(PgType::Uuid),
            DATE_ARRAY => array(PgType::Date),
            TIME_ARRAY => array(PgType::Time),
            TIMETZ_ARRAY => array(PgType::TimeTz),
            TIMESTAMP_ARRAY => array(PgType::Timestamp),
            TIMESTAMPTZ_ARRAY => array(PgType::TimestampTz),
            INTERVAL_ARRAY => array(PgType::Interval),
            BYTEA_ARRAY => array(PgType::Bytea),
            JSON_ARRAY => array(PgType::Json),
            JSONB_ARRAY => array(PgType::Jsonb),
            INET_ARRAY => array(PgType::Inet),
            CIDR_ARRAY => array(PgType::Cidr),
            MACADDR_ARRAY => array(PgType::MacAddr),
            MACADDR8_ARRAY => array(PgType::MacAddr8),
            _ => by_name(type_name),
        }
    }

    /// A short name for messages and errors: `int4`, `numeric`, `text[]`, `mood`.
    pub fn label(&self) -> String {
        match self {
            PgType::Array { element } => format!("{}[]", element.label()),
            PgType::Enum { name } | PgType::Domain { name, .. } | PgType::Other { name } => {
                name.clone()
            }
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned()),
        }
    }

    /// The type the mappings use: a domain's base type (through nested domains), else itself.
    pub fn resolved(&self) -> &PgType {
        let mut kind = self;
        while let PgType::Domain { base, .. } = kind {
            kind = base;
        }
        kind
    }

    /// The element delimiter of this type's array literal: `;` for box, `,` for every other builtin.
    pub fn array_delimiter(&self) -> char {
        match self.resolved() {
            PgType::Other { name } if name == "box" => ';',
            _ => ',',
        }
    }
}

/// Non-builtin types recognised by `format_type`'s name.
fn by_name(type_name: &str) -> PgType {
    let name = type_name.trim();
    if let Some(element) = name.strip_suffix("[]") {
        return PgType::Array {
            element: Box::new(by_name(element)),
        };
    }
    // citext may be schema-qualified when its schema is not on the search path.
    if name == "citext" || name.ends_with(".citext") {
        return PgType::Citext;
    }
    PgType::Other {
        name: name.to_owned(),
    }
}

/// Decodes numeric's typmod: `((p << 16) | (s & 0x7ff)) + VARHDRSZ`, -1 for none. PostgreSQL 15
/// made the scale an 11-bit signed field (-1000..=1000); for earlier servers (0..=p) the same
/// formula gives the same value.
pub(crate) fn numeric(typmod: i32) -> PgType {
    const VARHDRSZ: i32 = 4;
    if typmod < VARHDRSZ {
        return PgType::Numeric {
            precision: None,
            scale: None,
        };
    }
    let t = typmod - VARHDRSZ;
    let precision = ((t >> 16) & 0xffff) as u16;
    let scale = (((t & 0x7ff) ^ 1024) - 1024) as i16;
    PgType::Numeric {
        precision: Some(precision),
        scale: Some(scale),
    }
}

/// varchar(n)/char(n) store `n + VARHDRSZ`; -1 means no limit.
fn char_length(typmod: i32) -> Option<i32> {
    (typmod >= 4).then(|| typmod - 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typmod(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7ff)) + 4
    }

    #[test]
    fn numeric_typmods() {
        assert_eq!(
            PgType::from_catalog(1700, typmod(10, 2), "numeric(10,2)"),
            PgType::Numeric {
                precision: Some(10),
                scale: Some(2)
            }
        );
        assert_eq!(
            PgType::from_catalog(1700, -1, "numeric"),
            PgType::Numeric {
                precision: None,
                scale: None
            }
        );
        // PostgreSQL 15+: negative scale and scale above precision.
        assert_eq!(
            numeric(typmod(5, -3)),
            PgType::Numeric {
                precision: Some(5),
                scale: Some(-3)
            }
        );
        assert_eq!(
            numeric(typmod(3, 5)),
            PgType::Numeric {
                precision: Some(3),
                scale: Some(5)
            }
        );
        assert_eq!(
            numeric(typmod(1000, 1000)),
            PgType::Numeric {
                precision: Some(1000),
                scale: Some(1000)
            }
        );
        assert_eq!(
            numeric(typmod(1000, -1000)),
            PgType::Numeric {
                precision: Some(1000),
                scale: Some(-1000)
            }
        );
        // Array columns carry the element's typmod.
        assert_eq!(
            PgType::from_catalog(1231, typmod(38, 10), "numeric(38,10)[]"),
            PgType::Array {
                element: Box::new(PgType::Numeric {
                    precision: Some(38),
                    scale: Some(10)
                })
            }
        );
    }

    #[test]
    fn builtins_arrays_and_names() {
        assert_eq!(PgType::from_catalog(23, -1, "integer"), PgType::Int4);
        assert_eq!(
            PgType::from_catalog(1043, 24, "character varying(20)"),
            PgType::Varchar { length: Some(20) }
        );
        assert_eq!(
            PgType::from_catalog(1042, 5, "character(1)"),
            PgType::Char { length: Some(1) }
        );
        assert_eq!(
            PgType::from_catalog(1007, -1, "integer[]"),
            PgType::Array {
                element: Box::new(PgType::Int4)
            }
        );
        assert_eq!(PgType::from_catalog(16_385, -1, "citext"), PgType::Citext);
        assert_eq!(
            PgType::from_catalog(16_390, -1, "mood"),
            PgType::Other {
                name: "mood".into()
            }
        );
        assert_eq!(
            PgType::from_catalog(16_391, -1, "mood[]"),
            PgType::Array {
                element: Box::new(PgType::Other {
                    name: "mood".into()
                })
            }
        );
        assert_eq!(
            PgType::from_catalog(790, -1, "money"),
            PgType::Other {
                name: "money".into()
            }
        );
    }

    #[test]
    fn labels_and_domains() {
        let d = PgType::Domain {
            name: "posint".into(),
            base: Box::new(PgType::Domain {
                name: "inner".into(),
                base: Box::new(PgType::Int4),
            }),
        };
        assert_eq!(d.resolved(), &PgType::Int4);
        assert_eq!(d.label(), "posint");
        assert_eq!(PgType::TimestampTz.label(), "timestamptz");
        assert_eq!(
            PgType::Array {
                element: Box::new(PgType::Int8)
            }
            .label(),
            "int8[]"
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"type":"domain","name":"posint","base":{"type":"domain","name":"inner","base":{"type":"int4"}}}"#
        );
        assert_eq!(serde_json::from_str::<PgType>(&json).unwrap(), d);
    }
}
