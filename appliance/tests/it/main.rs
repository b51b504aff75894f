mod supervisor;
mod run;
mod db;
mod logmon;
mod admin;
