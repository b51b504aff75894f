mod admin;
mod console;
mod db;
mod logmon;
mod privilege;
mod run;
mod supervisor;
mod support;
