//! The domain: values that are checked once, when they enter, and the rules
//! that govern them. Nothing here does I/O, so every rule is unit-tested
//! without a database or a server.

pub mod api_key;
pub mod breaker;
pub mod campaign;
pub mod contact;
pub mod phone;
pub mod run;
pub mod sms;
pub mod template;

pub use api_key::{NewApiKey, PresentedKey, Scope};
pub use campaign::{
    Action, CampaignName, CampaignStatus, Channel, IllegalTransition, MaxAttempts,
    ProviderSettings, Sender,
};
pub use contact::{ContactError, CsvLayout, NewContact};
pub use phone::{PhoneNumber, Region};
pub use run::{ExecutionStatus, Recipients, RunStatus, SendResult};
pub use template::Template;
