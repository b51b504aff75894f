mod supervisor;
mod run;
