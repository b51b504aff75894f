mod admin;
mod db;
mod logmon;
mod run;
mod supervisor;
mod support;
